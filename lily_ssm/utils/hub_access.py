"""Whether a Hugging Face Hub repository can be used here, decided up front and within seconds.

Without this, a Hub id with no network makes huggingface_hub retry for about half a minute ("Retrying in
8s") before transformers gives up. :func:`require_hub_repo` instead looks in the local cache, probes the Hub
once per process (one request, a few seconds at most), and either lets the loaders go on or refuses the id in
one line that says what to do.
"""

from __future__ import annotations

import logging
import os
import re
import threading

PROBE_SECONDS = 3.0  # one request; a Hub that has not answered by then counts as unreachable
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_probed: dict[str, str | None] = {}  # endpoint -> why it is unreachable (None: it answered)
logger = logging.getLogger(__name__)


class HubError(ValueError):
    """A Hub id that cannot be resolved or pushed (offline, unknown repository or revision, ...)."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub repository id (``org/name``)."""
    return bool(_HUB_ID.match(name))


def hub_offline() -> bool:
    """Whether the Hub is switched off for this process (``HF_HUB_OFFLINE=1``, or :func:`go_offline`)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached from here, or ``None`` when it answers; probed once per process and
    endpoint, with one request bounded by :data:`PROBE_SECONDS` (DNS included)."""
    endpoint = hub_endpoint()
    if endpoint not in _probed:
        _probed[endpoint] = _probe(endpoint)
    return _probed[endpoint]


def _probe(endpoint: str) -> str | None:
    from huggingface_hub.utils import get_session

    outcome: list[str | None] = []

    def ask() -> None:
        try:  # any HTTP answer, even an error status, means the Hub is reachable
            get_session().head(endpoint, timeout=PROBE_SECONDS, follow_redirects=False)
            outcome.append(None)
        except Exception as exc:  # the HTTP client raises connection, DNS, proxy and TLS errors of many types
            outcome.append(" ".join(str(exc).split())[:160] or type(exc).__name__)

    thread = threading.Thread(target=ask, daemon=True)  # a hanging name lookup is not bound by the timeout
    thread.start()
    thread.join(PROBE_SECONDS + 0.5)
    return outcome[0] if outcome else f"no answer within {PROBE_SECONDS:g} s"


def go_offline() -> None:
    """Switch this process and the processes it starts to offline mode: loaders read the local cache
    without trying the Hub (and without retrying it)."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def is_cached(repo_id: str, filename: str, revision: str | None = None, repo_type: str = "model") -> bool:
    """Whether ``filename`` of the Hub repository ``repo_id`` at ``revision`` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type), str)


def require_hub_repo(repo_id: str, what: str = "model", filename: str = "config.json",
                     revision: str | None = None) -> None:
    """Refuse, within seconds and in one line that says what to do, a Hub repository this process cannot
    get: one whose ``filename`` is not in the local cache while the Hub is switched off or unreachable.
    When the Hub is unreachable but the repository is cached, switch to offline mode (:func:`go_offline`)
    and say so, so the loaders read the cache at once."""
    from huggingface_hub import constants

    cached = is_cached(repo_id, filename, revision)
    at = f" at revision {revision!r}" if revision else ""
    if hub_offline():
        if cached:
            return
        why = "the Hub is switched off (HF_HUB_OFFLINE=1)"
    else:
        reason = hub_unreachable()
        if reason is None:
            return
        if cached:
            go_offline()
            logger.warning(f"the Hugging Face Hub at {hub_endpoint()} is unreachable ({reason}); using the cached "
                           f"copy of {repo_id}{at}")
            return
        why = f"the Hub at {hub_endpoint()} is unreachable ({reason})"
    raise HubError(f"{what} {repo_id!r}{at} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                   f"{why}: download it on a machine with network (hf download {repo_id}), then copy that cache "
                   f"here or point HF_HOME at it; or pass a local folder")

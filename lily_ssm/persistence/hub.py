"""Adapters from the Hugging Face Hub: an ``org/name`` id resolves to a local snapshot of its
repository (see :mod:`.push` for the way up)."""

from __future__ import annotations

import os
from pathlib import Path

from ..utils.hub_access import HubError, hub_offline, is_hub_id, require_hub_repo

# What an adapter repository may hold that lily-ssm reads; never pickles (adapter_model.bin).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "experiment.yaml", "result.json", "results.json",
                 "README.md")
__all__ = ["ADAPTER_FILES", "HubError", "hub_offline", "hub_reason", "is_hub_id", "resolve_adapter"]


def resolve_adapter(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of an adapter: ``name_or_path`` itself when it exists here, else the snapshot
    of the Hub repository ``org/name`` at ``revision`` (a branch, tag or commit; default main),
    downloaded into (or, offline, read from) the Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    text = str(name_or_path)
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} was given, but {text} is a local folder; a revision applies to "
                             "a Hub adapter (org/name)")
        return path
    if isinstance(name_or_path, Path) or not is_hub_id(text):
        hint = "" if "/" in text else " (a Hub adapter is named org/name)"
        raise FileNotFoundError(f"adapter folder {text} does not exist{hint}")
    require_hub_repo(text, "adapter", "adapter_config.json", revision)  # within seconds, not after retries
    return _download(text, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    what = f"{repo_id!r} is not a folder here, and as a Hugging Face Hub adapter{at}"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(ADAPTER_FILES)))
    except LocalEntryNotFoundError as exc:
        if hub_offline():
            raise HubError(f"{what} it is not in the local cache and the Hub is switched off (HF_HUB_OFFLINE=1); "
                           "unset HF_HUB_OFFLINE, or give a local folder") from exc
        raise HubError(f"{what} it cannot be downloaded: the Hub is unreachable (offline? {hub_reason(exc)}) and it "
                       "is not in the local cache; give a local folder, or retry with a network") from exc
    except GatedRepoError as exc:
        raise HubError(f"{what} it is gated: request access on the Hub, then log in (hf auth login)") from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"{what} it has no revision {revision!r}") from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f"{what} no such repository exists (or it is private: log in with hf auth login)") from exc
    except HfHubHTTPError as exc:
        raise HubError(f"{what} the Hub refused it: {hub_reason(exc)}") from exc
    if not (folder / "adapter_config.json").is_file():
        raise HubError(f"Hub repository {repo_id!r}{at} holds no adapter_config.json: it is not an adapter")
    return folder


def hub_reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return " ".join(str(cause).split())[:200] or type(cause).__name__

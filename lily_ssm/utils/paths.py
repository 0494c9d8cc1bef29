"""Where lily-ssm keeps what it builds on the user's machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where built-in assets are kept: ``$LILY_SSM_CACHE``, else ``~/.cache/lily-ssm``."""
    return Path(os.environ.get("LILY_SSM_CACHE", Path.home() / ".cache" / "lily-ssm"))


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` can only mean a folder on this machine, not a hub id (``org/name`` or ``name``):
    absolute, ``~``, ``./`` or ``../``, ending in a separator, or with more than one ``/`` (``runs/x/y``)."""
    seps = {"/", os.sep, *([os.altsep] if os.altsep else [])}
    return (os.path.isabs(name) or name.startswith("~") or name in (".", "..")
            or any(name.startswith(f"{dots}{sep}") for dots in (".", "..") for sep in seps)
            or name[-1:] in seps or name.count("/") > 1 or (os.sep != "/" and os.sep in name))

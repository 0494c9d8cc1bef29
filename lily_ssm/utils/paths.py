"""Where lily-ssm keeps what it builds on the user's machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where built-in assets are kept: ``$LILY_SSM_CACHE``, else ``~/.cache/lily-ssm``."""
    return Path(os.environ.get("LILY_SSM_CACHE", Path.home() / ".cache" / "lily-ssm"))

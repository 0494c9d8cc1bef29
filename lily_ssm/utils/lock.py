"""One run per folder: an OS-level exclusive lock held for the run's whole life.

``fcntl.flock`` on ``<folder>/.lock``: the kernel releases it when the process ends, however it ends, so
a crashed run never leaves a stale lock, and two processes can never both hold it. The lock file is
never deleted (deleting it would let a third process lock a new file while the second still holds the
old one).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


class FolderBusyError(OSError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if needed) until the block ends; raise
    :class:`FolderBusyError` naming the holder's pid at once if another process holds it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; the {what} needs a folder there")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise FolderBusyError(f"{folder} is in use by another {what} (pid {holder}); wait for it to finish or "
                                  "choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the lock

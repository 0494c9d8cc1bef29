"""Jobs in fresh processes, ``workers`` at a time, quiet on the console and stoppable with one Ctrl-C.

Each job's process writes everything (its prints, warnings, progress bars of libraries, tracebacks)
to its own log file: its stdout and stderr are that file. It reports progress to the parent through a
pipe, as :class:`~lily_ssm.utils.progress.Snapshot` s. It ignores SIGINT: a Ctrl-C in a terminal
reaches every process of the group, and the parent alone decides, stopping every job (SIGTERM) before
it re-raises (a job then exits through ``SystemExit``; one that does not within ``STOP_SECONDS`` is
killed). Work a job leaves half done must be safe to lose that way (checkpoints count only when complete).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.progress import Snapshot

STOP_SECONDS = 10.0  # how long a stopped job may take to exit before it is killed


@dataclass(frozen=True)
class Job:
    """``target(payload, show)`` run in a process named ``name``, whose output goes to ``log_path``."""

    name: str
    payload: dict[str, Any]
    log_path: Path


def run_jobs(jobs: list[Job], workers: int, target: Callable[[dict[str, Any], Callable[[Snapshot], None]], None],
             show: Callable[[str, Snapshot], None], started: Callable[[str], None] = lambda name: None,
             ) -> Iterator[tuple[str, int | None]]:
    """Run ``jobs``, ``workers`` at a time (``target`` must be a module-level function); pass each job's
    snapshots to ``show(name, snapshot)``; yield ``(name, exit code)`` as each job ends. Leaving the
    iteration early (an error, a Ctrl-C, ``close()``) stops the jobs still running."""
    context = multiprocessing.get_context("spawn")  # fresh processes: no forked threads, honest peak memory
    pending, launched = list(jobs), []
    running: dict[int, tuple[Any, str, Any]] = {}  # sentinel -> (process, name, its pipe's reading end)
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                job.log_path.parent.mkdir(parents=True, exist_ok=True)
                reader, writer = context.Pipe(duplex=False)
                process = context.Process(target=_job_main, args=(target, job.payload, str(job.log_path), writer),
                                          name=job.name)
                launched.append(process)  # before start: a Ctrl-C during it still stops the process
                with _sigint_blocked():  # the child inherits the block until it ignores SIGINT itself
                    process.start()
                writer.close()
                running[process.sentinel] = (process, job.name, reader)
                started(job.name)
            readers = {reader: name for _, name, reader in running.values()}
            for ready in multiprocessing.connection.wait([*running, *readers]):
                if ready in readers:
                    _receive(ready, readers[ready], show)
                elif ready in running:
                    process, name, reader = running.pop(ready)
                    while _receive(reader, name, show):  # what it sent before it ended
                        pass
                    reader.close()
                    process.join()
                    yield name, process.exitcode
    finally:
        _stop([process for process in launched if process.pid is not None and process.exitcode is None])
        for _, _, reader in running.values():
            reader.close()


def _receive(reader: Any, name: str, show: Callable[[str, Snapshot], None]) -> bool:
    """Pass on one snapshot if one is waiting; False when none is (or the job's end closed the pipe)."""
    try:
        if not reader.poll():
            return False
        show(name, reader.recv())
        return True
    except (EOFError, OSError):
        return False


def _stop(processes: list[Any]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(STOP_SECONDS)
        if process.exitcode is None:
            process.kill()
            process.join()


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT held back (not lost) in this thread; a new process starts with it held back too."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _exit_when_stopped(signum: int, frame: Any) -> None:
    """Stopped by the parent: exit through Python, so that multiprocessing's own clean-up runs (a process
    killed outright leaves its semaphores, e.g. tqdm's lock, for the resource tracker to warn about)."""
    raise SystemExit(128 + signum)


def _job_main(target: Callable[..., None], payload: dict[str, Any], log_path: str, pipe: Any) -> None:
    """A job's process: ignore SIGINT, write all output to ``log_path``, run ``target``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_when_stopped)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C held back since the start is dropped
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    for stream in (1, 2):  # the file descriptors: output of C code and of any library lands there too
        os.dup2(fd, stream)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # a job stopped with SIGTERM loses no logged line
    sys.stderr.reconfigure(line_buffering=True)

    def show(snapshot: Snapshot) -> None:
        with contextlib.suppress(OSError):  # the parent is gone: the log file still has the job's progress
            pipe.send(snapshot)

    try:
        target(payload, show)
    finally:
        pipe.close()

"""A run's folder (docs/design.md §6), the one mechanism behind ``lily-ssm train``, each ``lily-ssm vtab`` task and each
ablation arm: whose run it is, which of its checkpoints are complete, one process at a time, and where to resume.

``run.json`` records the fingerprint of the settings that change the result (from the run's
:class:`~lily_ssm.config.record.ExperimentRecord`), and once the run has written its results, that it is
finished. By default (``resume: auto``) a rerun continues a folder whose fingerprint matches from its newest
complete checkpoint, reports a finished run instead of training it again, and refuses another run's folder
naming the differing keys; ``resume: false`` refuses any folder that holds results, ``overwrite`` clears it.

A checkpoint counts only when it is complete: the marker ``checkpoint_complete.json``, written last, lists
every file of ``checkpoint-N/`` with its size and SHA-256. Resume takes the newest complete checkpoint,
warning about (and removing) each newer one that is not. The folder is locked (an OS lock) for the run's life.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..utils.atomic import atomic_folder, write_atomic
from ..utils.lock import folder_lock
from ..utils.sections import ConfigError

RUN_RECORD = "run.json"
CHECKPOINT_MARKER = "checkpoint_complete.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # a run's final adapter: its presence marks a used folder
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
AUTO = "auto"  # the default of ``resume``: continue this run if its folder holds one, else start


def _file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def mark_checkpoint_complete(folder: Path, step: int) -> None:
    """Write the marker that makes ``folder`` count as a complete checkpoint (call it last)."""
    files = {str(p.relative_to(folder)): _file_digest(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != CHECKPOINT_MARKER}
    write_atomic(folder / CHECKPOINT_MARKER, json.dumps({"step": step, "files": files}, indent=1) + "\n")


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or ``None``."""
    marker = folder / CHECKPOINT_MARKER
    if not marker.is_file():
        return f"no {CHECKPOINT_MARKER} (its writing was interrupted)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{CHECKPOINT_MARKER} is unreadable"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _file_digest(path) != expected:
            return f"{name} differs from what {CHECKPOINT_MARKER} records"
    return None


def differences_between(recorded: dict[str, Any], current: dict[str, Any],
                        skip: tuple[str, ...] = ()) -> list[str]:
    """``key: new now, old in the folder`` for each setting that differs (``skip`` aside)."""
    keys = sorted((set(recorded) | set(current)) - set(skip))
    return [f"{key}: {current.get(key)!r} now, {recorded.get(key)!r} in the folder" for key in keys
            if recorded.get(key) != current.get(key)]


class RunFolder:
    """The folder of one run with settings ``fingerprint``.

    ``extendable`` settings may differ on resume (a run trained for longer, with a warning); ``outputs``
    are the files besides checkpoints that ``overwrite`` clears. ``writer`` is the process that may change
    the folder (rank 0 of a distributed run). Errors name ``source`` (the config file).
    """

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], *, source: str, what: str = "training run",
                 extendable: tuple[str, ...] = (), outputs: tuple[str, ...] = (),
                 log: Callable[[str], Any] = print, writer: bool = True) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.source, self.what, self.extendable = source, what, extendable
        self.outputs = (ADAPTER_WEIGHTS, *outputs)
        self.log, self.writer = log, writer

    def lock(self) -> contextlib.AbstractContextManager[Path]:
        """Hold the folder's exclusive lock (one process per run folder)."""
        return folder_lock(self.path, self.what)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every ``checkpoint-N`` folder, oldest first."""
        run_dir = self.path
        found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))] \
            if run_dir.is_dir() else []
        return sorted(found)

    def latest_complete(self, remove_skipped: bool = False) -> Path | None:
        """The newest complete checkpoint; each newer incomplete one is reported (and removed with
        ``remove_skipped``, so a resumed run does not write into a half-written folder)."""
        for _, folder in reversed(self.checkpoints()):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            self.log(f"warning: skipping {folder}: {problem}" + ("; removing it" if remove_skipped else ""))
            if remove_skipped:
                shutil.rmtree(folder)
        return None

    def rotate(self, keep: int | None, best: str | None = None) -> None:
        """Keep the newest ``keep`` complete checkpoints (and ``best``); remove older ones, complete or not."""
        if keep is None:
            return
        found = self.checkpoints()
        complete = [folder for _, folder in found if checkpoint_problem(folder) is None]
        kept = set(complete[-keep:]) | ({Path(best)} if best else set())
        newest = complete[-1] if complete else None
        for step, folder in found:
            if folder not in kept and newest is not None and step < int(newest.name.split("-")[1]):
                shutil.rmtree(folder)

    @contextlib.contextmanager
    def new_checkpoint(self, step: int, keep: int | None = None) -> Iterator[Path]:
        """Yield a temporary folder to write checkpoint ``step`` into; on success it is marked complete and
        renamed into place in one step, then older checkpoints beyond ``keep`` go."""
        with atomic_folder(self.path / f"checkpoint-{step}") as tmp:
            yield tmp
            mark_checkpoint_complete(tmp, step)
        self.rotate(keep)

    def holds_results(self) -> bool:
        """Whether the folder holds anything a run produced: checkpoints or a final adapter."""
        return bool(self.checkpoints()) or (self.path / ADAPTER_WEIGHTS).is_file()

    def _read_run(self, path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            run = json.loads(path.read_text())
            if not isinstance(run, dict) or not isinstance(run["fingerprint"], dict):
                raise TypeError("no fingerprint")
            return run
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is unreadable ({exc}); set training.overwrite: true to start over") from exc

    def _recorded(self, path: Path) -> dict[str, Any] | None:
        run = self._read_run(path)
        return run["fingerprint"] if run is not None else None

    def finished(self, resume: bool | str | None, overwrite: bool) -> dict[str, Any] | None:
        """What :meth:`finish` recorded, if this very run (every setting, ``extendable`` ones too) has finished
        here and is to be continued rather than started over; else ``None``. Reads only: nothing is created."""
        if overwrite or not _continues(resume):
            return None
        run = self._read_run(self.path / RUN_RECORD)
        if run is None or not isinstance(run.get("finished"), dict) or differences_between(run["fingerprint"],
                                                                                         self.fingerprint):
            return None
        return run["finished"]

    def finish(self, **summary: Any) -> None:
        """Record that the run has written its results (``summary``: e.g. its last step); a rerun reports it
        as finished. Call it last."""
        if self.writer:
            write_atomic(self.path / RUN_RECORD, json.dumps({"fingerprint": self.fingerprint, "finished": summary},
                                                            indent=1, sort_keys=True) + "\n")

    def prepare(self, resume: bool | str | None, overwrite: bool) -> Path | None:
        """Check the folder against this run and return the checkpoint to resume from (or None).

        ``resume``: ``auto`` (or true) continues this run from its newest complete checkpoint, and refuses a
        folder of another run; a path resumes from that checkpoint; false refuses a folder that holds results.
        ``overwrite`` clears the folder instead."""
        record_path = self.path / RUN_RECORD
        recorded = self._recorded(record_path)
        used = self.holds_results()

        if resume not in (False, None, AUTO, True) and not overwrite:  # an explicit checkpoint folder
            checkpoint = Path(str(resume))
            problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else "it is not a checkpoint folder"
            if problem:
                raise ConfigError(f"{self.source}: training.resume={resume!r}: {problem}")
            beside = self._recorded(checkpoint.parent / RUN_RECORD)
            if beside is not None:
                self._refuse_other_run(beside, checkpoint.parent / RUN_RECORD)
            self._record(record_path)
            return checkpoint
        if _continues(resume) and not overwrite:
            if used and recorded is None:
                raise ConfigError(f"{self.source}: {self.path} holds checkpoints or an adapter but no {RUN_RECORD}, so "
                                  "the settings they were trained with are unknown; set training.overwrite: true to "
                                  "start over, or choose another training.output_dir")
            if used:
                self._refuse_other_run(recorded, record_path)
                changed = differences_between({k: recorded.get(k) for k in self.extendable},
                                              {k: self.fingerprint.get(k) for k in self.extendable})
                if changed:
                    self.log(f"warning: resuming with {'; '.join(changed)}: the learning-rate schedule of the steps "
                             "already taken followed the old length")
                checkpoint = self.latest_complete(remove_skipped=self.writer)
                if checkpoint is None:
                    self.log(f"warning: {self.path} holds no complete checkpoint; training starts from the beginning")
                self._record(record_path)
                return checkpoint
        elif used and not overwrite:
            same = recorded is not None and not differences_between(recorded, self.fingerprint, self.extendable)
            raise ConfigError(f"{self.source}: training.resume: false, but training.output_dir {self.path} already "
                              f"holds the checkpoints or adapter of "
                              + ("an earlier run with these settings; remove training.resume: false to continue it, "
                                 "or set " if same else "another run; use another training.output_dir, or set ")
                              + "training.overwrite: true to replace it")
        if self.writer and overwrite and self.path.is_dir():
            for _, folder in self.checkpoints():
                shutil.rmtree(folder)
            for name in (*self.outputs, RUN_RECORD):
                (self.path / name).unlink(missing_ok=True)
        self._record(record_path)
        return None

    def _refuse_other_run(self, recorded: dict[str, Any], where: Path) -> None:
        differences = differences_between(recorded, self.fingerprint, self.extendable)
        if differences:
            raise ConfigError(f"{self.source}: cannot resume: {where} records another run's settings "
                              f"({'; '.join(differences)}); use another training.output_dir, or set "
                              "training.overwrite: true to replace that run")

    def _record(self, path: Path) -> None:
        if self.writer:
            write_atomic(path, json.dumps({"fingerprint": self.fingerprint}, indent=1, sort_keys=True) + "\n")


def _continues(resume: bool | str | None) -> bool:
    """Whether ``resume`` continues this run's own folder (``auto`` or true), rather than starting over
    (false) or naming a checkpoint folder."""
    return resume is True or resume == AUTO

"""A training run's folder: whose run it is, and which of its checkpoints are complete.

``run.json`` records a fingerprint of the settings that change the result. A rerun with
``training.resume`` continues only a folder whose fingerprint matches (a mismatch names the differing
keys); a fresh run refuses a folder that holds another run's checkpoints or adapter unless
``training.overwrite`` is set.

A checkpoint counts only when it is complete: the marker ``checkpoint_complete.json``, written last,
lists every file of ``checkpoint-N/`` with its size and SHA-256. Resume takes the newest complete
checkpoint, warning about (and removing) each newer one that is not.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from ..utils.atomic import write_atomic
from .config import ConfigError, ExperimentConfig

RUN_RECORD = "run.json"
CHECKPOINT_MARKER = "checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Settings that do not change what a run computes, or that a rerun may change on purpose.
_NOT_FINGERPRINTED = {"training": {"output_dir", "resume", "overwrite", "progress_bar", "logging_steps", "save_steps",
                                   "save_total_limit", "report_to"}}
_EXTENDABLE = ("training.epochs", "training.max_steps")  # a resumed run may train longer (with a warning)


def fingerprint(config: ExperimentConfig) -> dict[str, Any]:
    """``section.key -> value`` for every setting that changes the trained adapter."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in (values.items() if isinstance(values, dict) else ()):
            if key not in _NOT_FINGERPRINTED.get(section, ()):
                flat[f"{section}.{key}"] = value
    return json.loads(json.dumps(flat, sort_keys=True, default=str))  # as it reads back from run.json


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


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-N`` folder in ``run_dir``, oldest first."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))] \
        if run_dir.is_dir() else []
    return sorted(found)


def latest_complete_checkpoint(run_dir: Path, log: Any = print, remove_skipped: bool = False) -> Path | None:
    """The newest complete checkpoint of ``run_dir``; each newer incomplete one is reported (and removed
    with ``remove_skipped``, so a resumed run does not write into a half-written folder)."""
    for _, folder in reversed(checkpoints(run_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log(f"warning: skipping {folder}: {problem}" + ("; removing it" if remove_skipped else ""))
        if remove_skipped:
            shutil.rmtree(folder)
    return None


def rotate_checkpoints(run_dir: Path, keep: int | None, best: str | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints (and ``best``); remove older ones, complete or not."""
    if keep is None:
        return
    found = checkpoints(run_dir)
    complete = [folder for _, folder in found if checkpoint_problem(folder) is None]
    kept = set(complete[-keep:]) | ({Path(best)} if best else set())
    newest = complete[-1] if complete else None
    for step, folder in found:
        if folder not in kept and newest is not None and step < int(newest.name.split("-")[1]):
            shutil.rmtree(folder)


def differences_between(recorded: dict[str, Any], current: dict[str, Any],
                        skip: tuple[str, ...] = ()) -> list[str]:
    """``key: new now, old in the folder`` for each setting that differs (``skip`` aside)."""
    keys = sorted((set(recorded) | set(current)) - set(skip))
    return [f"{key}: {current.get(key)!r} now, {recorded.get(key)!r} in the folder" for key in keys
            if recorded.get(key) != current.get(key)]


def _holds_results(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything a run produced: checkpoints or a final adapter."""
    return bool(checkpoints(run_dir)) or (run_dir / "adapter_model.safetensors").is_file()


def prepare_run_folder(config: ExperimentConfig, log: Any = print, writer: bool = True) -> str | None:
    """Check ``training.output_dir`` against this run and return the checkpoint to resume from (or None).

    ``writer`` is the process that may change the folder (rank 0 of a distributed run): it records the
    run's fingerprint, removes skipped incomplete checkpoints, and clears the folder for ``overwrite``.
    """
    t = config.training
    run_dir = Path(t.output_dir)
    record_path = run_dir / RUN_RECORD
    current = fingerprint(config)
    recorded = None
    if record_path.is_file():
        try:
            recorded = json.loads(record_path.read_text())["fingerprint"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{record_path} is unreadable ({exc}); set training.overwrite: true to start "
                              "over") from exc
    used = _holds_results(run_dir)

    if t.resume is not False and t.resume is not None and not t.overwrite:
        if isinstance(t.resume, str):  # an explicit checkpoint folder
            checkpoint = Path(t.resume)
            problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else "it is not a checkpoint folder"
            if problem:
                raise ConfigError(f"{config.source}: training.resume={t.resume!r}: {problem}")
            beside = checkpoint.parent / RUN_RECORD
            if beside.is_file():
                _refuse_other_run(json.loads(beside.read_text())["fingerprint"], current, beside, config.source)
            _record(record_path, current, writer)
            return str(checkpoint)
        if used and recorded is None:
            raise ConfigError(f"{config.source}: training.output_dir {run_dir} holds checkpoints or an adapter but no "
                              f"{RUN_RECORD}, so the settings they were trained with are unknown; set "
                              "training.overwrite: true to start over, or choose another output_dir")
        if used:
            _refuse_other_run(recorded, current, record_path, config.source)
            changed = differences_between({k: recorded.get(k) for k in _EXTENDABLE},
                                          {k: current.get(k) for k in _EXTENDABLE})
            if changed:
                log(f"warning: resuming with {'; '.join(changed)}: the learning-rate schedule of the steps already "
                    "taken followed the old length")
            checkpoint = latest_complete_checkpoint(run_dir, log, remove_skipped=writer)
            if checkpoint is None:
                log(f"warning: {run_dir} holds no complete checkpoint; training starts from the beginning")
            _record(record_path, current, writer)
            return str(checkpoint) if checkpoint else None
    elif used and not t.overwrite:
        same = recorded is not None and not differences_between(recorded, current, _EXTENDABLE)
        raise ConfigError(f"{config.source}: training.output_dir {run_dir} already holds the checkpoints or adapter of "
                          f"{'an earlier run with these settings' if same else 'another run'}; set training.resume: "
                          f"true to continue it{' (same settings only)' if not same else ''}, or training.overwrite: "
                          "true to replace it")
    if writer and t.overwrite and run_dir.is_dir():
        for _, folder in checkpoints(run_dir):
            shutil.rmtree(folder)
        for name in ("adapter_model.safetensors", "adapter_config.json", "train_log.jsonl", RUN_RECORD):
            (run_dir / name).unlink(missing_ok=True)
    _record(record_path, current, writer)
    return None


def _refuse_other_run(recorded: dict[str, Any], current: dict[str, Any], where: Path, source: str) -> None:
    differences = differences_between(recorded, current, _EXTENDABLE)
    if differences:
        raise ConfigError(f"{source}: cannot resume: {where} records another run's settings ({'; '.join(differences)});"
                          " use another training.output_dir, or set training.overwrite: true to replace that run")


def _record(path: Path, current: dict[str, Any], writer: bool) -> None:
    if writer:
        write_atomic(path, json.dumps({"fingerprint": current}, indent=1, sort_keys=True) + "\n")

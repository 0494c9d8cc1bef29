"""The record a run leaves beside its adapter: which base model, prompt protocol, method and settings made it.

``lily-ssm train`` writes ``experiment.yaml`` (the whole config) into its output folder; ``lily-ssm vtab``
writes ``result.json`` (the task's model, adapter and training sections, with its result) into each task
folder. :func:`read_record` reads either, for a run folder or one of its ``checkpoint-N`` folders, into one
:class:`ExperimentRecord`; the command line, ``inspect``, ``convert``, ``push`` and resuming all go through
it (docs/design.md §6).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..utils.atomic import write_atomic
from ..utils.sections import ConfigError, read_yaml_file

EXPERIMENT_NAME = "experiment.yaml"  # written by `lily-ssm train` beside the adapter it trains
RESULT_NAME = "result.json"  # written by `lily-ssm vtab` beside each task's adapter
KINDS = ("language", "vtab")


@dataclass(frozen=True)
class ExperimentRecord:
    """One run's settings by section (``model``, ``adapter``, ``data``, ``training``) and where they were read."""

    kind: str  # "language" (lily-ssm train) or "vtab"
    settings: dict[str, Any]
    source: Path | None = field(default=None, compare=False)
    task: str | None = None  # a VTAB record's task

    def section(self, name: str) -> dict[str, Any]:
        value = self.settings.get(name)
        return value if isinstance(value, dict) else {}

    @property
    def base_model(self) -> str | None:
        """The base model: a language run's ``model.name_or_path``; a VTAB task's checkpoint, else its preset."""
        model = self.section("model")
        found = model.get("name_or_path") if self.kind == "language" else model.get("checkpoint") or model.get("preset")
        return found if isinstance(found, str) and found else None

    @property
    def protocol(self) -> str | None:
        """The prompt protocol a language run trained with (records from before protocols existed were
        trained with today's ``clean`` template); None for VTAB."""
        return self.section("data").get("protocol", "clean") if self.kind == "language" else None

    @property
    def method(self) -> str | None:
        method = self.section("adapter").get("method")
        return method if isinstance(method, str) else None

    def fingerprint(self, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        """``section.key -> value`` for every setting but those in ``skip``, as it reads back from JSON."""
        flat = {f"{name}.{key}": value for name, values in self.settings.items() if isinstance(values, dict)
                for key, value in values.items() if f"{name}.{key}" not in skip}
        return json.loads(json.dumps(flat, sort_keys=True, default=str))

    def write(self, folder: str | Path) -> Path:
        """Write a language run's ``experiment.yaml`` into ``folder`` (atomically); returns its path."""
        if self.kind != "language":
            raise ValueError(f"a {self.kind} record is written with its result ({RESULT_NAME}), not as "
                             f"{EXPERIMENT_NAME}")
        path = Path(folder) / EXPERIMENT_NAME
        write_atomic(path, yaml.safe_dump(self.settings, sort_keys=False))
        return path


def read_record(folder: str | Path) -> ExperimentRecord | None:
    """The record in ``folder`` or its parent (for a ``checkpoint-N`` folder): a language run's
    ``experiment.yaml``, or a VTAB task's ``result.json``; ``None`` if there is neither."""
    folder = Path(folder)
    for where in (folder, folder.parent):
        if (where / EXPERIMENT_NAME).is_file():
            path = where / EXPERIMENT_NAME
            raw = read_yaml_file(path) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: expected a mapping with model / adapter / data / training sections")
            return ExperimentRecord("language", raw, path)
        if (where / RESULT_NAME).is_file():
            path = where / RESULT_NAME
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path} is not readable JSON ({' '.join(str(exc).split())})") from exc
            config = result.get("config") if isinstance(result, dict) else None
            if isinstance(config, dict) and isinstance(config.get("model"), dict):
                task = result.get("task")
                return ExperimentRecord("vtab", config, path, task if isinstance(task, str) else where.name)
    return None

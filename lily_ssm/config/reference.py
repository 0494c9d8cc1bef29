"""``lily-ssm config``: every key of a config file, its default and its meaning, read from the schemas the validator
uses (the section dataclasses' and the adapter configs' fields), so the two cannot drift."""

from __future__ import annotations

from collections.abc import Iterable

from ..tuners import CONFIG_CLASSES
from ..utils.sections import section_reference
from . import experiment, vtab

Row = tuple[str, str, str]  # (dotted key, default, meaning)
Group = tuple[str, list[Row]]  # (heading, rows)

SET_HELP = ("--set section.key=value overrides one key (repeatable); the value is read as YAML: "
            "--set training.learning_rate=1e-4, --set adapter.targets=[in_proj,dt_proj]. A longer dotted key reaches "
            "into a mapping the file holds: --set adapter.overrides.dt_proj.r=4 (the longest key that exists wins, "
            "so in_proj.x stays one key); set a whole mapping as YAML: --set 'adapter.overrides={dt_proj: {r: 4}}'")


def section_rows(name: str, cls: type, skip: Iterable[str] = ()) -> list[Row]:
    """The rows of section ``name`` (a section dataclass), without the keys in ``skip``."""
    return [(f"{name}.{key}", default, meaning) for key, default, meaning in section_reference(cls)
            if key not in set(skip)]


def adapter_groups(extra: dict[str, str] | None = None) -> list[Group]:
    """The ``adapter`` section of each method (``adapter.method`` picks one), plus ``extra`` keys and their
    meaning (e.g. VTAB's ``per_task``)."""
    groups = []
    for method, cls in CONFIG_CLASSES.items():
        rows = [("adapter.method", method, f"the adapter method: {' or '.join(CONFIG_CLASSES)}")]
        rows += section_rows("adapter", cls)
        rows += [(f"adapter.{key}", "{}", meaning) for key, meaning in (extra or {}).items()]
        groups.append((f"adapter (method: {method})", rows))
    return groups


def experiment_groups(sections: dict[str, type], adapter_extra: dict[str, str] | None = None,
                      skip: Iterable[str] = ()) -> list[Group]:
    """One group per section of ``sections``, and after ``model`` the adapter's (with ``adapter_extra`` keys;
    ``None``: the file has no adapter section); ``skip`` holds dotted keys left out."""
    skip = set(skip)
    groups = []
    for name, cls in sections.items():
        groups.append((name, [row for row in section_rows(name, cls) if row[0] not in skip]))
        if name == "model" and adapter_extra is not None:
            groups += adapter_groups(adapter_extra)
    return groups


def train_groups() -> list[Group]:
    """``lily-ssm train``'s keys."""
    return experiment_groups(experiment.SECTIONS, {})


def vtab_groups() -> list[Group]:
    """``lily-ssm vtab``'s keys."""
    return experiment_groups(vtab.SECTIONS, vtab.ADAPTER_EXTRAS)


def format_reference(title: str, groups: list[Group]) -> str:
    """The groups as aligned text: a heading per group, then ``key  default  meaning`` per row."""
    rows = [row for _, group in groups for row in group]
    key_width = max(len(key) for key, _, _ in rows)
    default_width = min(max(len(default) for _, default, _ in rows), 24)
    lines = [title, ""]
    for heading, group in groups:
        lines.append(f"{heading}:")
        for key, default, meaning in group:
            lines.append(f"  {key:<{key_width}}  {default:<{default_width}}  {meaning}")
        lines.append("")
    lines.append(SET_HELP)
    return "\n".join(lines)

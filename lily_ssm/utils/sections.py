"""YAML config files made of sections (docs/design.md §7): one dataclass per section, whose fields carry their own
meaning and valid range (:func:`setting`), so the validator, the error messages and ``lily-ssm config`` read one source.

Values come from the file and from ``--set section.key=value`` overrides (parsed as YAML scalars).
Every error names the file and the key, in one line.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Bound:
    """The valid range of a numeric setting: at least ``low`` (above it when ``strict``), finite, or one of
    ``special`` (values with a meaning of their own, e.g. ``max_steps=-1``: train by epochs)."""

    low: float
    strict: bool = False
    special: tuple[float, ...] = ()
    note: str = ""

    def allows(self, value: int | float) -> bool:
        if value in self.special:
            return True
        return math.isfinite(value) and (value > self.low if self.strict else value >= self.low)

    def describe(self, kind: str) -> str:
        text = f"a {kind} {'>' if self.strict else '>='} {self.low:g}"
        return f"{text} {self.note}" if self.note else text


def setting(default: Any = MISSING, *, help: str, bound: Bound | None = None,
            default_factory: Any = MISSING) -> Any:
    """A section field with its one-line meaning (``help``) and, for a number, its valid range."""
    metadata = {"help": help, "bound": bound}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def section_reference(cls: type) -> list[tuple[str, str, str]]:
    """``(key, default, meaning)`` of every field of the section class ``cls``, as ``lily-ssm config`` prints."""
    rows = []
    for f in fields(cls):
        if _required(f):
            default = "(required)"
        else:
            value = f.default_factory() if f.default is MISSING else f.default
            default = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        bound = f.metadata.get("bound")
        meaning = f.metadata.get("help", "")
        if bound is not None:
            meaning += f" ({bound.describe('number' if 'float' in str(f.type) else 'whole number')})"
        rows.append((f.name, default, meaning))
    return rows


def parse_section(cls: type, values: Any, source: str, name: str) -> Any:
    """An instance of the section class ``cls`` from a raw mapping; unknown, missing, mistyped and
    out-of-range values are refused naming ``source`` and ``name.key``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {name!r} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"valid keys in {name}: {', '.join(known)} (lily-ssm config lists them with their meaning)")
    missing = [k for k, f in known.items() if k not in values and _required(f)]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {', '.join(f'{name}.{k}' for k in missing)}")
    values = dict(values)
    for key, value in values.items():
        expected = known[key].type
        values[key] = value = _coerce_number(value, expected)
        if not _type_ok(value, expected):
            raise ConfigError(f"{source}: {name}.{key}={value!r} should be {expected}")
        bound = known[key].metadata.get("bound")
        if bound is not None and isinstance(value, (int, float)) and not bound.allows(value):
            kind = "number" if "float" in str(expected) else "whole number"
            raise ConfigError(f"{source}: {name}.{key}={value!r} is out of range; it must be {bound.describe(kind)}")
    return cls(**values)


def _coerce_number(value: Any, annotation: str) -> Any:
    """YAML 1.1 reads ``5e-4`` as a string; accept it where a float is expected."""
    if isinstance(value, str) and "float" in str(annotation).split(" | "):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_ok(value: Any, annotation: str) -> bool:
    allowed = {"str": str, "int": int, "float": (int, float), "bool": bool, "None": type(None),
               "dict[str, Any]": dict}
    for part in str(annotation).split("|"):
        kind = allowed.get(part.strip())
        if kind is None:
            return True
        if isinstance(value, bool) and part.strip() in ("int", "float"):
            continue
        if isinstance(value, kind):
            return True
    return False


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str,
                    sections: tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config mapping. A longer dotted key
    reaches into a mapping the file holds (``adapter.overrides.dt_proj.r=4``; see :func:`_set_dotted`)."""
    if overrides and not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(sections)}, "
                          f"got {type(raw).__name__}")
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. training.learning_rate=1e-4")
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in sections:
            raise ConfigError(f"--set {item!r}: unknown section {section!r}; sections: {', '.join(sections)}")
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(raw[section]).__name__}")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {' '.join(str(exc).split())}") from exc
        _set_dotted(raw[section], section, key.split("."), value, item)
    return raw


def _set_dotted(mapping: dict[str, Any], where: str, parts: list[str], value: Any, item: str) -> None:
    """Set the dotted key ``parts`` in ``mapping`` (at ``where``). The longest run of parts that is a key there
    wins (so a target key such as ``in_proj.x`` stays one key) and the rest reaches into its value, which must
    be a mapping; a key that is not there is added only as the last part (a new leaf, never a new mapping)."""
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in mapping:
            break
    else:
        if len(parts) == 1:
            mapping[parts[0]] = value
            return
        nested = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        example = yaml.safe_dump(nested, default_flow_style=True, width=1000).strip()
        raise ConfigError(f"--set {item!r}: {where} has no key {parts[0]!r} to reach into (keys there: "
                          f"{', '.join(map(str, mapping)) or 'none'}); set the whole mapping as YAML instead, e.g. "
                          f"--set '{where}.{parts[0]}={example}'")
    if n == len(parts):
        mapping[key] = value
        return
    if not isinstance(mapping[key], dict):
        raise ConfigError(f"--set {item!r}: {where}.{key} is {mapping[key]!r}, not a mapping to reach into")
    _set_dotted(mapping[key], f"{where}.{key}", parts[n:], value, item)


def parse_sections(raw: Any, classes: dict[str, type], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a raw config has exactly the sections ``classes`` plus ``adapter``; returns the parsed
    dataclass sections and the adapter mapping. Errors name the file and section."""
    names = (*classes, "adapter")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(names)}")
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; sections: {', '.join(names)}")
    for name in names:
        if name not in raw:
            raise ConfigError(f"{source}: missing section {name!r}")
    if not isinstance(raw["adapter"], dict):
        raise ConfigError(f"{source}: section 'adapter' must be a mapping")
    return {name: parse_section(cls, raw[name], source, name) for name, cls in classes.items()}, dict(raw["adapter"])


def read_yaml_file(path: Path) -> Any:
    """A YAML file's content; a file that is not UTF-8 or not YAML raises :class:`ConfigError` naming it."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc


def read_yaml(path: str | Path, overrides: list[str] | None, sections: tuple[str, ...]) -> dict[str, Any]:
    """A YAML config file as a mapping, with ``--set`` overrides applied; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = read_yaml_file(path) or {}
    return apply_overrides(raw, overrides or [], str(path), sections)

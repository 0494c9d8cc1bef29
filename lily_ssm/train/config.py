"""Experiment configuration: one YAML file with ``model``, ``adapter``, ``data`` and ``training``
sections, plus ``--set section.key=value`` overrides from the command line."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..data.prompts import PROTOCOLS
from ..tuners import AdapterConfig, config_from_dict

EXPERIMENT_NAME = "experiment.yaml"  # written by `lily-ssm train` beside the adapter it trains


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Bound:
    """The valid range of a numeric config value: at least ``low`` (above it when ``strict``), finite,
    or one of ``special`` (values with a meaning of their own, e.g. ``max_steps=-1``: train by epochs)."""

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


@dataclass
class ModelSection:
    name_or_path: str
    dtype: str = "auto"
    device_map: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False


@dataclass
class DataSection:
    train_file: str
    cutoff_len: int = 256
    val_set_size: int = 120
    train_on_inputs: bool = True
    add_eos: bool = True
    protocol: str = "paper"  # paper: the published prompts, left padding, best checkpoint by eval loss

    bounds: ClassVar[dict[str, Bound]] = {"cutoff_len": Bound(1), "val_set_size": Bound(0)}


@dataclass
class TrainingSection:
    output_dir: str
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16
    micro_batch_size: int = 4
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_scheduler: str = "linear"
    eval_steps: int = 200
    save_steps: int = 200
    save_total_limit: int = 3
    logging_steps: int = 10
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    resume: bool | str = False
    overwrite: bool = False  # a fresh run may replace another run's checkpoints and adapter in output_dir
    progress_bar: bool = True
    report_to: str | list[str] = "none"  # experiment trackers for the Trainer: none, tensorboard, wandb, ... or all

    bounds: ClassVar[dict[str, Bound]] = {
        "epochs": Bound(0, strict=True), "max_steps": Bound(1, special=(-1,), note="(or -1: train for epochs)"),
        "batch_size": Bound(1), "micro_batch_size": Bound(1), "learning_rate": Bound(0, strict=True),
        "weight_decay": Bound(0), "warmup_steps": Bound(0), "eval_steps": Bound(1), "save_steps": Bound(1),
        "save_total_limit": Bound(1), "logging_steps": Bound(1), "seed": Bound(0),
    }


@dataclass
class ExperimentConfig:
    model: ModelSection
    adapter: dict[str, Any]
    data: DataSection
    training: TrainingSection
    source: str = field(default="<dict>", compare=False)

    def adapter_config(self) -> AdapterConfig:
        try:
            return config_from_dict(self.adapter)
        except ValueError as exc:
            raise ConfigError(f"{self.source}: adapter: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        return data


_SECTIONS = {"model": ModelSection, "data": DataSection, "training": TrainingSection}


def _section(cls: type, values: Any, source: str, name: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {name!r} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"valid keys in {name}: {', '.join(known)}")
    missing = [k for k, f in known.items() if k not in values and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {', '.join(f'{name}.{k}' for k in missing)}")
    values = dict(values)
    for key, value in values.items():
        expected = known[key].type
        values[key] = value = _coerce_number(value, expected)
        if not _type_ok(value, expected):
            raise ConfigError(f"{source}: {name}.{key}={value!r} should be {expected}")
        bound = getattr(cls, "bounds", {}).get(key)
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
                    sections: tuple[str, ...] = (*_SECTIONS, "adapter")) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars) to a raw config mapping."""
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
            raw[section][key] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not a valid YAML scalar: {' '.join(str(exc).split())}"
                              ) from exc
    return raw


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
    return {name: _section(cls, raw[name], source, name) for name, cls in classes.items()}, dict(raw["adapter"])


def parse_config(raw: Any, source: str = "<dict>") -> ExperimentConfig:
    sections, adapter = parse_sections(raw, _SECTIONS, source)
    config = ExperimentConfig(adapter=adapter, source=source, **sections)
    if config.data.protocol not in PROTOCOLS:
        raise ConfigError(f"{source}: data.protocol={config.data.protocol!r}; protocols: {', '.join(PROTOCOLS)}")
    if config.training.bf16 and config.training.fp16:
        raise ConfigError(f"{source}: training.bf16 and training.fp16 are both true; choose one precision")
    _check_output_dir(config.training.output_dir, source)
    config.training.report_to = check_report_to(config.training.report_to, f"{source}: training.report_to")
    adapter_config = config.adapter_config()  # validate now, not after the model has loaded
    problem = getattr(adapter_config, "lookahead_problem", lambda _: None)(config.data.train_on_inputs)
    if problem:
        raise ConfigError(f"{source}: adapter.routing={adapter_config.routing!r} with "
                          f"data.train_on_inputs={config.data.train_on_inputs}: {problem}")
    return config


def check_report_to(value: Any, where: str) -> str | list[str]:
    """``value`` as the Trainer's ``report_to`` (``none``, ``all``, or integration names), checked now: an
    unknown name lists the known ones, a tracker that is not installed says what to install."""
    from transformers.integrations import integration_utils as integrations

    if value in ("none", "all"):
        return value
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}={value!r}; give none, all, or tracker names (a name or a list)")
    known = list(integrations.INTEGRATION_TO_CALLBACK)
    for name in names:
        if name not in known:
            raise ConfigError(f"{where}: unknown tracker {name!r}; trackers: none, all, {', '.join(known)}")
        available = next((getattr(integrations, f) for f in (f"is_{name}_available",
                          f"is_{name.replace('_', '')}_available", f"is_{name.split('_')[0]}_available")
                          if hasattr(integrations, f)), None)
        if available is not None and not available():
            package = {"azure_ml": "azureml-core", "flyte": "flytekit"}.get(name, name.replace("_", "-"))
            raise ConfigError(f"{where}: {name} is not installed (pip install {package})")
    return names


def _check_output_dir(output_dir: str, source: str) -> None:
    """Refuse an output folder that is (or lies under) an existing regular file, before the model loads."""
    path = Path(output_dir).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is an existing file" if candidate == path else f"lies under {candidate}, which is a file"
                raise ConfigError(f"{source}: training.output_dir={output_dir!r} {where}; it must be a folder "
                                  "(new or existing)")
            return


def _read_yaml_file(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc


def read_yaml(path: str | Path, overrides: list[str] | None = None,
              sections: tuple[str, ...] = (*_SECTIONS, "adapter")) -> dict[str, Any]:
    """A YAML config file as a mapping, with ``--set`` overrides applied; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = _read_yaml_file(path) or {}
    return apply_overrides(raw, overrides or [], str(path), sections)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config and apply ``--set`` overrides; errors name the file and key."""
    return parse_config(read_yaml(path, overrides), str(path))


def read_experiment_record(folder: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The ``experiment.yaml`` that ``lily-ssm train`` wrote in ``folder`` or its parent (for a
    ``checkpoint-N`` folder), as a raw mapping with its path; ``None`` if there is none."""
    folder = Path(folder)
    for candidate in (folder / EXPERIMENT_NAME, folder.parent / EXPERIMENT_NAME):
        if candidate.is_file():
            raw = _read_yaml_file(candidate) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{candidate}: expected a mapping with model / adapter / data / training sections")
            return candidate, raw
    return None


def recorded_protocol(raw: dict[str, Any]) -> str:
    """The prompt protocol an experiment record was trained with; records from before protocols
    existed were trained with today's ``clean`` template."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    return data.get("protocol", "clean")

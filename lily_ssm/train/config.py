"""Experiment configuration: one YAML file with ``model``, ``adapter``, ``data`` and ``training``
sections, plus ``--set section.key=value`` overrides from the command line."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..data.prompts import PROTOCOLS
from ..tuners import AdapterConfig, config_from_dict

EXPERIMENT_NAME = "experiment.yaml"  # written by `lily-ssm train` beside the adapter it trains


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and key."""


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
    progress_bar: bool = True


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
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. training.learning_rate=1e-4")
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in sections:
            raise ConfigError(f"--set {item!r}: unknown section {section!r}; sections: {', '.join(sections)}")
        raw.setdefault(section, {})[key] = yaml.safe_load(text) if text else ""
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
    adapter_config = config.adapter_config()  # validate now, not after the model has loaded
    problem = getattr(adapter_config, "lookahead_problem", lambda _: None)(config.data.train_on_inputs)
    if problem:
        raise ConfigError(f"{source}: adapter.routing={adapter_config.routing!r} with "
                          f"data.train_on_inputs={config.data.train_on_inputs}: {problem}")
    return config


def read_yaml(path: str | Path, overrides: list[str] | None = None,
              sections: tuple[str, ...] = (*_SECTIONS, "adapter")) -> dict[str, Any]:
    """A YAML config file as a mapping, with ``--set`` overrides applied; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
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
            try:
                raw = yaml.safe_load(candidate.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{candidate} is not valid YAML: {exc}") from exc
            if not isinstance(raw, dict):
                raise ConfigError(f"{candidate}: expected a mapping with model / adapter / data / training sections")
            return candidate, raw
    return None


def recorded_protocol(raw: dict[str, Any]) -> str:
    """The prompt protocol an experiment record was trained with; records from before protocols
    existed were trained with today's ``clean`` template."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    return data.get("protocol", "clean")

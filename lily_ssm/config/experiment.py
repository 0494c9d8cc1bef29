"""The language fine-tuning schema (``lily-ssm train``): one YAML file with ``model``, ``adapter``, ``data`` and
``training`` sections, plus ``--set section.key=value`` overrides from the command line."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data.commonsense import check_train_source
from ..data.prompts import PROTOCOLS
from ..models.loading import check_model_source, parse_dtype
from ..tuners import AdapterConfig, config_from_dict
from ..utils.sections import Bound, ConfigError, parse_sections, read_yaml, setting
from .record import ExperimentRecord


@dataclass
class ModelSection:
    name_or_path: str = setting(help="base model: a Hub id, a local folder (transformers' or a "
                                "mamba-ssm checkpoint's), or builtin:tiny-falcon-mamba")
    dtype: str = setting("auto", help="weights' dtype: auto, float32, bfloat16 or float16")
    device_map: str | None = setting(None, help="accelerate's device map, e.g. auto for one process on many GPUs; "
                                            "unset: the Trainer places the model")
    tokenizer: str | None = setting(None, help="tokenizer, when not the base model's own")
    trust_remote_code: bool = setting(False, help="run a Hub model's own modelling code")


@dataclass
class DataSection:
    train_file: str = setting(help="Commonsense170K-style JSON / JSONL file, or builtin:synthetic-commonsense")
    cutoff_len: int = setting(256, help="tokens per example; longer ones are cut", bound=Bound(1))
    val_set_size: int = setting(120, help="rows held out for the validation loss (0: none)", bound=Bound(0))
    train_on_inputs: bool = setting(True, help="train on the prompt tokens too (false: on the response only)")
    add_eos: bool = setting(True, help="end each training example with the EOS token")
    protocol: str = setting("paper", help="paper: the published prompts, left padding, best checkpoint by "
                                          "validation loss; clean: lily-ssm's one template")


@dataclass
class TrainingSection:
    output_dir: str = setting(help="run folder: checkpoints, the final adapter, logs")
    epochs: float = setting(1.0, help="passes over the training data (unless max_steps is set)",
                            bound=Bound(0, strict=True))
    max_steps: int = setting(-1, help="optimizer steps; -1 trains for epochs",
                             bound=Bound(1, special=(-1,), note="(or -1: train for epochs)"))
    batch_size: int = setting(16, help="examples per optimizer step (all processes together)", bound=Bound(1))
    micro_batch_size: int = setting(4, help="examples per forward pass and process (gradients accumulate)",
                                    bound=Bound(1))
    learning_rate: float = setting(3e-4, help="peak learning rate of AdamW", bound=Bound(0, strict=True))
    weight_decay: float = setting(0.0, help="AdamW weight decay", bound=Bound(0))
    warmup_steps: int = setting(100, help="linear warm-up steps", bound=Bound(0))
    lr_scheduler: str = setting("linear", help="transformers' scheduler name after warm-up: linear, cosine, ...")
    eval_steps: int = setting(200, help="steps between validation losses", bound=Bound(1))
    save_steps: int = setting(200, help="steps between checkpoints", bound=Bound(1))
    save_total_limit: int = setting(3, help="complete checkpoints kept (the best one too)", bound=Bound(1))
    logging_steps: int = setting(10, help="steps between log lines", bound=Bound(1))
    seed: int = setting(42, help="seed of the adapter's initial weights and the data order", bound=Bound(0))
    bf16: bool = setting(False, help="bf16 mixed precision")
    fp16: bool = setting(False, help="fp16 mixed precision with loss scaling")
    gradient_checkpointing: bool = setting(False, help="recompute the layers in backward to save memory")
    resume: bool | str = setting("auto", help="auto: continue this run from its last complete checkpoint (a "
                                              "finished run is reported, another run's folder refused); false: "
                                              "start over in an empty folder only; or a checkpoint folder")
    overwrite: bool = setting(False, help="start over, replacing the checkpoints and adapter in output_dir")
    progress_bar: bool = setting(True, help="show a progress line: step/total, loss, learning rate, ETA")
    report_to: str | list[str] = setting("none", help="experiment trackers: none, all, or names such as tensorboard "
                                                      "or wandb")


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

    def check_inputs(self) -> None:
        """Raise :class:`ConfigError` naming the key if an input cannot be used (see
        :func:`check_experiment_inputs`); run it before anything heavy."""
        check_experiment_inputs(asdict(self.model), asdict(self.data), self.source)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        return data

    def record(self) -> ExperimentRecord:
        """This run's record (written as ``experiment.yaml`` beside its adapter)."""
        return ExperimentRecord("language", self.to_dict())


SECTIONS = {"model": ModelSection, "data": DataSection, "training": TrainingSection}
# Settings that do not change what a run computes, or that a rerun may change on purpose.
NOT_FINGERPRINTED = frozenset({"training.output_dir", "training.resume", "training.overwrite", "training.progress_bar",
                               "training.logging_steps", "training.save_steps", "training.save_total_limit",
                               "training.report_to"})
EXTENDABLE = ("training.epochs", "training.max_steps")  # a resumed run may train longer (with a warning)


def parse_config(raw: Any, source: str = "<dict>") -> ExperimentConfig:
    sections, adapter = parse_sections(raw, SECTIONS, source)
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


def check_experiment_inputs(model: dict[str, Any], data: dict[str, Any], source: str) -> None:
    """Raise :class:`ConfigError` naming the key if an input of a ``model`` / ``data`` section cannot be used: a
    local model, tokenizer or data file that does not exist, an unknown ``builtin:`` name, a bad dtype. Loads
    and writes nothing, so it runs before anything heavy; a Hub id must be cached or reachable (in seconds)."""
    checks = [("model.name_or_path", model.get("name_or_path"), check_model_source),
              ("model.tokenizer", model.get("tokenizer"), lambda name: check_model_source(name, "tokenizer")),
              ("model.dtype", model.get("dtype"), parse_dtype),
              ("data.train_file", data.get("train_file"), check_train_source)]
    for key, value, check in checks:
        if value is None:
            continue
        try:
            check(value)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from exc


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


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config and apply ``--set`` overrides; errors name the file and key."""
    return parse_config(read_yaml(path, overrides, (*SECTIONS, "adapter")), str(path))

"""The VTAB-1K schema (``lily-ssm vtab``): ``model`` (the backbone), ``adapter`` (with optional per-task
settings), ``data`` and ``training`` sections."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..data.vtab import NUM_CLASSES, TASKS
from ..models.backbones import BACKBONES, build_backbone, image_settings
from ..models.loading import check_model_source
from ..models.vit import ImageSettings
from ..tuners import AdapterConfig, apply_adapter, config_from_dict
from ..utils.sections import Bound, ConfigError, parse_sections, read_yaml, setting
from .record import ExperimentRecord

# Keys added after the first release, left out of a section's record at these values, so that vim run
# folders and ablation arms recorded before them still resume.
_LATER_KEYS = {"kind": "vim", "mean": None, "std": None}


@dataclass
class VtabModelSection:
    """The backbone. ``kind``: ``vim`` or ``vit``. ``preset``: the architecture without a checkpoint (default
    ``vim_small`` / ``vit_base_patch16_224``). ``checkpoint``: a Vim ``.pth``, or for ``vit`` an HF-format folder
    or hub id. ``img_size``: Vim's (224 when unset); a ViT checkpoint's comes from its config. ``mean`` /
    ``std``: the input normalisation (unset: ImageNet's for Vim, the checkpoint's preprocessor_config.json for
    ViT). ``overrides``: ``VimConfig`` / ``ViTConfig`` fields, e.g. for a tiny model."""

    kind: str = setting("vim", help="backbone: vim (Vision Mamba) or vit (a transformers ViT)")
    preset: str | None = setting(None, help="architecture without a checkpoint (vim_small, vit_base_patch16_224, ...)")
    checkpoint: str | None = setting(None, help="weights: a Vim .pth file, or for vit an HF folder or Hub id")
    img_size: int | None = setting(None, help="Vim's input size (224 when unset); a ViT checkpoint's own")
    mean: Any = setting(None, help="input normalisation mean (R, G, B); unset: ImageNet's or the checkpoint's")
    std: Any = setting(None, help="input normalisation std (R, G, B); give with mean")
    overrides: dict[str, Any] = setting(default_factory=dict, help="VimConfig / ViTConfig fields, e.g. for a tiny "
                                                                   "model")

    def __post_init__(self) -> None:
        if self.kind in BACKBONES and self.preset is None:
            self.preset = BACKBONES[self.kind]["preset"]
        if self.kind == "vim" and self.img_size is None:
            self.img_size = 224

    def check(self) -> None:
        """Raise ``ValueError`` (one line) on an unknown kind or preset, or a malformed mean / std."""
        if self.kind not in BACKBONES:
            raise ValueError(f"model.kind={self.kind!r}; kinds: {', '.join(BACKBONES)}")
        presets = BACKBONES[self.kind]["presets"]
        if self.preset not in presets:
            raise ValueError(f"model.preset={self.preset!r} for kind {self.kind}; presets: {', '.join(presets)}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, list) and len(value) == 3 and
                                          all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"model.{name}={value!r}; give three numbers (R, G, B), or leave it unset")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError(f"model.std={self.std!r}; the values must be positive")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"model.mean={self.mean!r}, model.std={self.std!r}: give both or neither")

    @property
    def head(self) -> str:
        """The name of the kind's classifier head."""
        return BACKBONES[self.kind]["head"]

    def record(self) -> dict[str, Any]:
        """The section as recorded in fingerprints, results and ablation specs (see ``_LATER_KEYS``)."""
        return {k: v for k, v in asdict(self).items() if not (k in _LATER_KEYS and v == _LATER_KEYS[k])}

    def backbone(self, task: str, weights: bool = True) -> nn.Module:
        """The backbone (from its checkpoint when given) with a fresh head for ``task``
        (:func:`lily_ssm.models.backbones.build_backbone`)."""
        self.check()
        return build_backbone(self.kind, self.preset, NUM_CLASSES[task], self.checkpoint, self.img_size,
                              self.overrides, weights=weights)

    def image_settings(self, model: nn.Module) -> ImageSettings:
        """The image size and normalisation ``model`` (built from this section) is fed with."""
        return image_settings(self.kind, model, self.checkpoint, self.mean, self.std)


@dataclass
class VtabDataSection:
    root: str = setting(help="the VTAB-1K root: <task>/{train800val200,test}.txt and the images they list (see "
                             "lily-ssm vtab --help; a generated stand-in: lily-ssm fake-vtab ROOT)")
    batch_size: int = setting(64, help="images per step", bound=Bound(1))
    num_workers: int = setting(0, help="DataLoader worker processes", bound=Bound(0))


@dataclass
class VtabTrainingSection:
    output_dir: str = setting(help="run folder: one sub-folder per task with its checkpoints, adapter and result")
    epochs: int = setting(100, help="passes over train800val200", bound=Bound(1))
    learning_rate: float = setting(1e-3, help="peak learning rate of AdamW", bound=Bound(0, strict=True))
    weight_decay: float = setting(1e-4, help="AdamW weight decay", bound=Bound(0))
    warmup_epochs: int = setting(10, help="linear warm-up epochs, then cosine decay", bound=Bound(0))
    eval_every: int = setting(10, help="epochs between test accuracies (and after the last)", bound=Bound(1))
    seed: int = setting(42, help="seed of the head, the adapter and the data order", bound=Bound(0))
    resume: bool | str = setting("auto", help="auto: continue each task from its last complete checkpoint (a "
                                              "finished task is reported, another run's folder refused); false: "
                                              "start over in an empty task folder only")
    overwrite: bool = setting(False, help="start over, replacing a task's checkpoints, adapter and result")


SECTIONS = {"model": VtabModelSection, "data": VtabDataSection, "training": VtabTrainingSection}
# Keys of the adapter section beyond the method's own fields, with their meaning (``lily-ssm config vtab``).
ADAPTER_EXTRAS = {"per_task": "per VTAB task, adapter settings merged over the section's (overrides merged per "
                              "target), e.g. {cifar: {num_B: 6}}"}
NOT_FINGERPRINTED = frozenset({"training.output_dir", "training.resume", "training.overwrite", "training.eval_every"})
EXTENDABLE = ("training.epochs",)  # a resumed task may train longer (with a warning)


@dataclass
class VtabExperiment:
    model: VtabModelSection
    adapter: dict[str, Any]
    data: VtabDataSection
    training: VtabTrainingSection
    source: str = "<dict>"

    def task_adapter(self, task: str | None) -> dict[str, Any]:
        """The adapter settings ``task`` trains with: the adapter section, with its ``per_task`` entry for
        the task merged over it (``overrides`` merged per target), and the classifier head saved (Vim's
        ``head``, ViT's ``classifier``)."""
        adapter = dict(self.adapter)
        extra = dict((adapter.pop("per_task", None) or {}).get(task) or {})
        overrides = {key: dict(values) for key, values in (adapter.get("overrides") or {}).items()}
        for key, values in (extra.pop("overrides", None) or {}).items():
            overrides[key] = {**overrides.get(key, {}), **values}
        adapter.update(extra)
        if overrides:
            adapter["overrides"] = overrides
        adapter["modules_to_save"] = sorted({*adapter.get("modules_to_save", []), self.model.head})
        return adapter

    def adapter_config(self, task: str | None = None) -> AdapterConfig:
        where = f"adapter (task {task})" if task else "adapter"
        try:
            return config_from_dict(self.task_adapter(task))
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{self.source}: {where}: {exc}") from exc

    def build_model(self, task: str) -> nn.Module:
        """The backbone (from a checkpoint when given) with a fresh head for ``task`` and the adapter."""
        return apply_adapter(self.model.backbone(task), self.adapter_config(task))

    def check_inputs(self, tasks: list[str]) -> None:
        """Raise :class:`ConfigError` if an input of ``tasks`` is missing (:func:`check_vtab_inputs`); run it
        before anything heavy."""
        check_vtab_inputs(asdict(self.model), self.data.root, tasks, self.source)

    def record(self, task: str) -> ExperimentRecord:
        """What ``task``'s result depends on (its fingerprint and ``result.json``'s config)."""
        return ExperimentRecord("vtab", {"model": self.model.record(), "adapter": self.task_adapter(task),
                                         "data": {"batch_size": self.data.batch_size},
                                         "training": asdict(self.training)})


def check_vtab_inputs(model: dict[str, Any], root: str, tasks: list[str], source: str) -> None:
    """Raise :class:`ConfigError` naming the key if the ``model`` section's checkpoint (a Vim ``.pth`` file; for
    ViT a local folder, unless it is a Hub id) or a task's split lists under ``root`` are missing. Reads
    nothing but the file system."""
    checkpoint = model.get("checkpoint")
    if checkpoint and model.get("kind", "vim") == "vim" and not Path(checkpoint).expanduser().is_file():
        raise ConfigError(f"{source}: model.checkpoint={checkpoint!r} is not a file; give a Vim .pth checkpoint, or "
                          "leave it unset to train from scratch")
    if checkpoint and model.get("kind") == "vit":
        try:
            check_model_source(checkpoint, "ViT checkpoint")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{source}: model.checkpoint: {exc}") from exc
    if not Path(root).expanduser().is_dir():
        raise ConfigError(f"{source}: data.root={root!r} is not a folder; give the VTAB-1K root that holds "
                          "<task>/train800val200.txt, <task>/test.txt and their images")
    for task in tasks:
        for split in ("train800val200", "test"):  # the splits lily-ssm vtab trains and tests on
            path = Path(root).expanduser() / task / f"{split}.txt"
            if not path.is_file():
                raise ConfigError(f"{source}: data.root: {path} is missing; data.root must hold the VTAB-1K task "
                                  "folders (<task>/train800val200.txt, <task>/test.txt and their images)")


def load_vtab_config(path: str | Path, overrides: list[str] | None = None) -> VtabExperiment:
    """Read a VTAB YAML config (sections model, adapter, data, training) with ``--set`` overrides."""
    source = str(path)
    parsed, adapter = parse_sections(read_yaml(path, overrides, (*SECTIONS, "adapter")), SECTIONS, source)
    try:
        parsed["model"].check()
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    experiment = VtabExperiment(adapter=adapter, source=source, **parsed)
    per_task = adapter.get("per_task") or {}
    if not isinstance(per_task, dict) or not all(isinstance(v, dict) for v in per_task.values()):
        raise ConfigError(f"{source}: adapter.per_task must map task names to adapter settings, got {per_task!r}")
    unknown = sorted(set(per_task) - set(TASKS))
    if unknown:
        raise ConfigError(f"{source}: adapter.per_task has unknown task(s) {', '.join(unknown)}; "
                          f"tasks: {', '.join(TASKS)}")
    for task in [None, *per_task]:
        experiment.adapter_config(task)
    return experiment

"""VTAB-1K fine-tuning with an adapter: train on ``train800val200``, report test accuracy.

The backbone is the ``model`` section's ``kind``: ``vim`` (lily-ssm's Vision Mamba, the default) or
``vit`` (a transformers ViT, the paper's ViT-B/16 comparison; :mod:`lily_ssm.models.vit`).

A plain loop (AdamW, linear warmup then cosine decay, per step): small enough to read at once. The
classifier head is new for every task and trains with the adapter (``modules_to_save``). After every
epoch the adapter, head, optimizer state and progress are checkpointed as one unit, a folder
``checkpoint-<epoch>/`` that appears in one rename, so an interrupted run resumes from a consistent
state; the folder is locked while a task trains, and a rerun with other settings is refused. The
reported figure is the test accuracy after the final epoch; the best test accuracy seen during training
(the published code's figure, i.e. selection on the test set) is kept only as a labelled extra.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.vtab import GROUPS, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES, TASKS, VTabDataset, group_means
from ..models.vim import VIM_PRESETS, VimConfig, VimGeometry, VisionMamba, load_vim_checkpoint
from ..models.vit import VIT_PRESETS, ImageSettings, build_vit, vit_image_settings
from ..persistence import load_adapter, save_adapter
from ..report import parameter_report
from ..tuners import apply_adapter, config_from_dict
from ..utils.atomic import atomic_folder, write_atomic
from ..utils.lock import folder_lock
from ..utils.safe_load import load_tensors_file
from .config import ConfigError, parse_sections, read_yaml
from .guards import all_finite, diverged
from .run_folder import differences_between

STATE_NAME = "train_state.json"
OPTIMIZER_NAME = "optimizer.pt"


MODEL_KINDS: dict[str, dict[str, Any]] = {
    # kind -> its presets, default preset, classifier head (a module trained and saved with the adapter)
    "vim": {"presets": VIM_PRESETS, "preset": "vim_small", "head": "head"},
    "vit": {"presets": VIT_PRESETS, "preset": "vit_base_patch16_224", "head": "classifier"},
}
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

    kind: str = "vim"
    preset: str | None = None
    checkpoint: str | None = None
    img_size: int | None = None
    mean: Any = None
    std: Any = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind in MODEL_KINDS and self.preset is None:
            self.preset = MODEL_KINDS[self.kind]["preset"]
        if self.kind == "vim" and self.img_size is None:
            self.img_size = 224

    def check(self) -> None:
        """Raise ``ValueError`` (one line) on an unknown kind or preset, or a malformed mean / std."""
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model.kind={self.kind!r}; kinds: {', '.join(MODEL_KINDS)}")
        presets = MODEL_KINDS[self.kind]["presets"]
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
        return MODEL_KINDS[self.kind]["head"]

    def record(self) -> dict[str, Any]:
        """The section as recorded in fingerprints, results and ablation specs (see ``_LATER_KEYS``)."""
        return {k: v for k, v in asdict(self).items() if not (k in _LATER_KEYS and v == _LATER_KEYS[k])}


@dataclass
class VtabDataSection:
    root: str
    batch_size: int = 64
    num_workers: int = 0


@dataclass
class VtabTrainingSection:
    output_dir: str
    epochs: int = 100
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 10
    eval_every: int = 10
    seed: int = 42
    overwrite: bool = False  # start over when checkpoints of other settings are there


@dataclass
class VtabExperiment:
    model: VtabModelSection
    adapter: dict[str, Any]
    data: VtabDataSection
    training: VtabTrainingSection
    source: str = "<dict>"


def load_vtab_config(path: str | Path, overrides: list[str] | None = None) -> VtabExperiment:
    """Read a VTAB YAML config (sections model, adapter, data, training) with ``--set`` overrides."""
    source = str(path)
    classes = {"model": VtabModelSection, "data": VtabDataSection, "training": VtabTrainingSection}
    parsed, adapter = parse_sections(read_yaml(path, overrides, (*classes, "adapter")), classes, source)
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
        _adapter_config(experiment, task)
    return experiment


def task_adapter(experiment: VtabExperiment, task: str | None) -> dict[str, Any]:
    """The adapter settings ``task`` trains with: the adapter section, with its ``per_task`` entry for
    the task merged over it (``overrides`` merged per target), and the classifier head saved (Vim's
    ``head``, ViT's ``classifier``)."""
    adapter = dict(experiment.adapter)
    extra = dict((adapter.pop("per_task", None) or {}).get(task) or {})
    overrides = {key: dict(values) for key, values in (adapter.get("overrides") or {}).items()}
    for key, values in (extra.pop("overrides", None) or {}).items():
        overrides[key] = {**overrides.get(key, {}), **values}
    adapter.update(extra)
    if overrides:
        adapter["overrides"] = overrides
    adapter["modules_to_save"] = sorted({*adapter.get("modules_to_save", []), experiment.model.head})
    return adapter


def _adapter_config(experiment: VtabExperiment, task: str | None = None):
    where = f"adapter (task {task})" if task else "adapter"
    try:
        return config_from_dict(task_adapter(experiment, task))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{experiment.source}: {where}: {exc}") from exc


def build_model(experiment: VtabExperiment, task: str) -> nn.Module:
    """The backbone (from a checkpoint when given) with a fresh head for ``task`` and the adapter."""
    return apply_adapter(build_backbone(experiment.model, task), _adapter_config(experiment, task))


def build_backbone(m: VtabModelSection, task: str, weights: bool = True) -> nn.Module:
    """The backbone of section ``m`` (from its checkpoint when given) with a fresh head for ``task``.

    Vim: a checkpoint's geometry is read off its tensors; ``img_size`` and ``overrides.stride`` (and
    ``patch_size``) of the section are tried first, so a non-standard checkpoint loads when they are set.
    ViT: a ``ViTForImageClassification`` (:func:`lily_ssm.models.vit.build_vit`); ``weights=False`` reads
    only its checkpoint's config (for planning)."""
    m.check()
    if m.kind == "vit":
        return build_vit(NUM_CLASSES[task], m.checkpoint, m.preset, m.img_size, m.overrides, weights=weights)
    if m.checkpoint:
        preset = VIM_PRESETS[m.preset](img_size=m.img_size, **m.overrides)
        preferred = VimGeometry(preset.img_size, preset.patch_size, preset.stride)
        model = load_vim_checkpoint(m.checkpoint, preferred=preferred)
        model.head = nn.Linear(model.config.embed_dim, NUM_CLASSES[task])
        model.config = VimConfig(**{**model.config.to_dict(), "num_classes": NUM_CLASSES[task]})
    else:
        preset = VIM_PRESETS[m.preset](img_size=m.img_size, num_classes=NUM_CLASSES[task], **m.overrides)
        model = VisionMamba(preset)
    return model


def image_settings(m: VtabModelSection, model: nn.Module) -> ImageSettings:
    """The image size and normalisation ``model`` (built from section ``m``) is fed with."""
    if m.kind == "vit":
        return vit_image_settings(model, m.checkpoint, m.mean, m.std)
    if m.mean is not None:
        return ImageSettings(model.config.img_size, tuple(m.mean), tuple(m.std), "model.mean / model.std")
    return ImageSettings(model.config.img_size, IMAGENET_MEAN, IMAGENET_STD, "ImageNet")


def logits_of(output: Any) -> torch.Tensor:
    """The class scores of a backbone's output (Vim returns them; transformers wraps them in ``.logits``)."""
    return output.logits if hasattr(output, "logits") else output


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for pixels, labels in loader:
        correct += (logits_of(model(pixels)).argmax(-1) == labels).sum().item()
        total += labels.numel()
    return correct / max(total, 1)


def run_vtab_task(experiment: VtabExperiment, task: str, log: Any = print) -> dict[str, Any]:
    """Train and test one task; resumes from ``<output_dir>/<task>/`` if a checkpoint is there."""
    if task not in NUM_CLASSES:
        raise ValueError(f"unknown VTAB task {task!r}; tasks: {', '.join(TASKS)}")
    t, d = experiment.training, experiment.data
    out = Path(t.output_dir) / task
    torch.manual_seed(t.seed)
    model = build_model(experiment, task)
    images = image_settings(experiment.model, model)
    log(f"{task}: {images.size} px images, mean {images.mean}, std {images.std} ({images.source})")
    train = VTabDataset(d.root, task, "train800val200", image_size=images.size, mean=images.mean, std=images.std)
    test = VTabDataset(d.root, task, "test", image_size=images.size, mean=images.mean, std=images.std)
    generator = torch.Generator().manual_seed(t.seed)
    train_loader = DataLoader(train, batch_size=d.batch_size, shuffle=True, num_workers=d.num_workers,
                              generator=generator)
    test_loader = DataLoader(test, batch_size=d.batch_size, num_workers=d.num_workers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(t.warmup_epochs * steps_per_epoch, t.epochs * steps_per_epoch))

    with folder_lock(out, "VTAB run"):
        return _train_task(experiment, task, model, optimizer, scheduler, train_loader, test_loader, generator, log)


def vtab_fingerprint(experiment: VtabExperiment, task: str) -> dict[str, Any]:
    """``section.key -> value`` for the settings a task's result depends on."""
    sections = {"model": experiment.model.record(), "adapter": task_adapter(experiment, task),
                "data": {"batch_size": experiment.data.batch_size}, "training": asdict(experiment.training)}
    skip = {"training.output_dir", "training.overwrite", "training.eval_every"}
    flat = {f"{name}.{key}": value for name, values in sections.items() for key, value in values.items()
            if f"{name}.{key}" not in skip}
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    return found[-1][1] if found else None


def _train_task(experiment: VtabExperiment, task: str, model: nn.Module, optimizer: Any, scheduler: Any,
                train_loader: DataLoader, test_loader: DataLoader, generator: torch.Generator,
                log: Any) -> dict[str, Any]:
    t = experiment.training
    out = Path(t.output_dir) / task
    steps_per_epoch = len(train_loader)
    current = vtab_fingerprint(experiment, task)
    latest = _latest_checkpoint(out)
    if latest is not None and t.overwrite:
        for folder in out.glob("checkpoint-*"):
            shutil.rmtree(folder)
        latest = None
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_test_accuracy": None}
    if latest is not None:
        saved = json.loads((latest / STATE_NAME).read_text())
        differences = differences_between(saved.get("fingerprint", {}), current, ("training.epochs",))
        if differences:
            raise ConfigError(f"{experiment.source}: {latest} was trained with other settings "
                              f"({'; '.join(differences)}); use another training.output_dir, or set "
                              "training.overwrite: true to start over")
        if saved["fingerprint"].get("training.epochs") != t.epochs:
            log(f"warning: {task}: resuming with training.epochs={t.epochs} (was "
                f"{saved['fingerprint'].get('training.epochs')}): the schedule of the epochs already run followed "
                "the old length")
        state = saved["state"]
        load_adapter(model, latest)
        optimizer.load_state_dict(load_tensors_file(latest / OPTIMIZER_NAME, "optimizer state"))
        scheduler.last_epoch = state["epoch"] * steps_per_epoch
        log(f"{task}: resuming after epoch {state['epoch']} ({latest})")
    report = parameter_report(model)
    log(f"{task}: {NUM_CLASSES[task]} classes, {len(train_loader.dataset)} train / {len(test_loader.dataset)} test "
        f"images, {report.adapter_total:,} adapter + {report.other_trainable:,} head parameters")

    params = [p for p in model.parameters() if p.requires_grad]
    for epoch in range(state["epoch"] + 1, t.epochs + 1):
        model.train()
        start, losses = time.perf_counter(), []
        generator.manual_seed(t.seed + epoch)  # each epoch's order depends on the epoch only: resumable
        for pixels, labels in train_loader:
            loss = nn.functional.cross_entropy(logits_of(model(pixels)), labels)
            loss.backward()
            step = (epoch - 1) * steps_per_epoch + len(losses) + 1
            if not all_finite([loss.detach(), *(p.grad for p in params)]):
                raise diverged(step, f"{task}: the loss or a gradient is not finite")
            optimizer.step()
            if not all_finite(params):
                raise diverged(step, f"{task}: an adapter weight is not finite after the optimizer step")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        record: dict[str, Any] = {"epoch": epoch, "loss": sum(losses) / len(losses),
                                  "seconds": round(time.perf_counter() - start, 2)}
        if epoch % t.eval_every == 0 or epoch == t.epochs:
            record["test_accuracy"] = accuracy(model, test_loader)
            best = state["best_test_accuracy"]
            state["best_test_accuracy"] = max(best, record["test_accuracy"]) if best is not None else \
                record["test_accuracy"]
        state["history"].append(record)
        state["epoch"] = epoch
        log(f"{task} epoch {epoch}/{t.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                           if k != "epoch"))
        _save_checkpoint(out, epoch, model, optimizer, {"fingerprint": current, "state": state})

    save_adapter(model, out)  # the task's adapter, beside its result
    result = {"task": task, "group": next(g for g, ts in GROUPS.items() if task in ts),
              "test_accuracy": state["history"][-1].get("test_accuracy"),
              "best_test_accuracy_seen": state["best_test_accuracy"], "epochs": state["epoch"],
              "train_seconds": round(sum(h["seconds"] for h in state["history"]), 2),
              "adapter_parameters": report.adapter_total, "head_parameters": report.other_trainable,
              "history": state["history"],
              "config": {"model": experiment.model.record(), "adapter": task_adapter(experiment, task),
                         "training": asdict(experiment.training)}}
    write_atomic(out / "result.json", json.dumps(result, indent=1) + "\n")
    return result


def _save_checkpoint(out: Path, epoch: int, model: nn.Module, optimizer: Any, record: dict[str, Any]) -> None:
    """``checkpoint-<epoch>/`` (adapter + head, optimizer state, progress), in one rename; older ones go."""
    with atomic_folder(out / f"checkpoint-{epoch}") as tmp:
        save_adapter(model, tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(record, indent=1) + "\n")
    for folder in out.glob("checkpoint-*"):
        if folder.name != f"checkpoint-{epoch}" and folder.is_dir():
            shutil.rmtree(folder)


def summarize(results: dict[str, dict[str, Any]], output_dir: str | Path) -> str:
    """Per-task and group-mean table (final-epoch accuracy; best-seen as a labelled extra column)."""
    final = {task: 100 * r["test_accuracy"] for task, r in results.items()}
    best = {task: 100 * r["best_test_accuracy_seen"] for task, r in results.items()}
    lines = ["| task | group | test acc. (final epoch) | best test acc. seen (selection on test) |",
             "|---|---|---:|---:|"]
    lines += [f"| {task} | {results[task]['group']} | {final[task]:.1f} | {best[task]:.1f} |" for task in results]
    means_final, means_best = group_means(final), group_means(best)
    lines += [f"| **{name}** | | **{value:.1f}** | {means_best[name]:.1f} |" for name, value in means_final.items()]
    table = "\n".join(lines) + "\n"
    out = Path(output_dir)
    write_atomic(out / "results.md", table)
    write_atomic(out / "results.json", json.dumps({"tasks": results, "means_final": means_final,
                                                   "means_best_seen": means_best}, indent=1) + "\n")
    return table

"""VTAB-1K fine-tuning with an adapter: train on ``train800val200``, report test accuracy.

The backbone is the ``model`` section's ``kind``: ``vim`` (lily-ssm's Vision Mamba, the default) or
``vit`` (a transformers ViT, the paper's ViT-B/16 comparison; :mod:`lily_ssm.models.backbones`).

A plain loop (AdamW, linear warmup then cosine decay, per step): small enough to read at once. The
classifier head is new for every task and trains with the adapter (``modules_to_save``). Each task's
folder is a :class:`~lily_ssm.train.run_folder.RunFolder`: after every epoch the adapter, head, optimizer
state and progress are checkpointed as one complete unit, so an interrupted run resumes from a consistent
state; the folder is locked while a task trains, and a rerun with other settings is refused. The
reported figure is the test accuracy after the final epoch; the best test accuracy seen during training
(the published code's figure, i.e. selection on the test set) is kept only as a labelled extra.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config.record import RESULT_NAME
from ..config.vtab import EXTENDABLE, NOT_FINGERPRINTED, VtabExperiment
from ..data.vtab import GROUPS, NUM_CLASSES, TASKS, VTabDataset
from ..evaluation.vtab import accuracy
from ..models.backbones import logits_of
from ..persistence import load_adapter, save_adapter
from ..tuners.report import parameter_report
from ..utils.atomic import write_atomic
from ..utils.progress import ConsoleProgress, Progress, Snapshot
from ..utils.safe_load import load_tensors_file
from .guards import all_finite, diverged
from .run_folder import RunFolder

STATE_NAME = "train_state.json"
OPTIMIZER_NAME = "optimizer.pt"


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def run_vtab_task(experiment: VtabExperiment, task: str, log: Any = print,
                  show_progress: Callable[[Snapshot], None] | None = None) -> dict[str, Any]:
    """Train and test one task in ``<output_dir>/<task>/``: by default (``training.resume: auto``) a checkpoint of
    this run there is resumed and a finished run's result is returned as it is (see
    :meth:`~lily_ssm.train.run_folder.RunFolder.prepare`). Progress (a line per task) goes to ``show_progress``,
    by default a console line whose plain form goes through ``log``."""
    if task not in NUM_CLASSES:
        raise ValueError(f"unknown VTAB task {task!r}; tasks: {', '.join(TASKS)}")
    data, training = experiment.data, experiment.training
    experiment.check_inputs([task])  # a missing input fails before the folder or the model is touched
    run = RunFolder(Path(training.output_dir) / task, experiment.record(task).fingerprint(NOT_FINGERPRINTED),
                    source=experiment.source, what="VTAB run", extendable=EXTENDABLE, outputs=("adapter_config.json",
                                                                                              RESULT_NAME), log=log)
    finished = run.finished(training.resume, training.overwrite)
    if finished is not None and (run.path / RESULT_NAME).is_file():
        log(f"{task}: already finished ({finished.get('epochs')} epochs): result {run.path / RESULT_NAME}, adapter "
            f"{run.path}/; set training.overwrite: true to train it again")
        return json.loads((run.path / RESULT_NAME).read_text())
    with run.lock():
        checkpoint = run.prepare(training.resume, training.overwrite)  # a refused folder costs no model build
        torch.manual_seed(training.seed)
        model = experiment.build_model(task)
        images = experiment.model.image_settings(model)
        log(f"{task}: {images.size} px images, mean {images.mean}, std {images.std} ({images.source})")
        train = VTabDataset(data.root, task, "train800val200", image_size=images.size, mean=images.mean, std=images.std)
        test = VTabDataset(data.root, task, "test", image_size=images.size, mean=images.mean, std=images.std)
        generator = torch.Generator().manual_seed(training.seed)
        train_loader = DataLoader(train, batch_size=data.batch_size, shuffle=True, num_workers=data.num_workers,
                                  generator=generator)
        test_loader = DataLoader(test, batch_size=data.batch_size, num_workers=data.num_workers)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
        steps_per_epoch = len(train_loader)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(training.warmup_epochs * steps_per_epoch, training.epochs * steps_per_epoch))
        progress = Progress(task, show_progress or ConsoleProgress(log=log))
        return _train_task(experiment, task, run, checkpoint, model, optimizer, scheduler, train_loader, test_loader,
                           generator, log, progress)


def _train_task(experiment: VtabExperiment, task: str, run: RunFolder, checkpoint: Path | None, model: nn.Module,
                optimizer: Any, scheduler: Any, train_loader: DataLoader, test_loader: DataLoader,
                generator: torch.Generator, log: Any, progress: Progress) -> dict[str, Any]:
    training = experiment.training
    steps_per_epoch = len(train_loader)
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_test_accuracy": None}
    if checkpoint is not None:
        state = json.loads((checkpoint / STATE_NAME).read_text())
        load_adapter(model, checkpoint)
        optimizer.load_state_dict(load_tensors_file(checkpoint / OPTIMIZER_NAME, "optimizer state"))
        scheduler.last_epoch = state["epoch"] * steps_per_epoch
        log(f"{task}: resuming from {checkpoint.name} (epoch {state['epoch']} of {training.epochs})")
    report = parameter_report(model)
    log(f"{task}: {NUM_CLASSES[task]} classes, {len(train_loader.dataset)} train / {len(test_loader.dataset)} test "
        f"images, {report.adapter_total:,} adapter + {report.other_trainable:,} head parameters")

    params = [p for p in model.parameters() if p.requires_grad]
    progress.begin(training.epochs * steps_per_epoch, state["epoch"] * steps_per_epoch)
    for epoch in range(state["epoch"] + 1, training.epochs + 1):
        model.train()
        start, losses = time.perf_counter(), []
        generator.manual_seed(training.seed + epoch)  # each epoch's order depends on the epoch only: resumable
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
            progress.update(step, sum(losses) / len(losses), scheduler.get_last_lr()[0])
        record: dict[str, Any] = {"epoch": epoch, "loss": sum(losses) / len(losses),
                                  "seconds": round(time.perf_counter() - start, 2)}
        if epoch % training.eval_every == 0 or epoch == training.epochs:
            record["test_accuracy"] = accuracy(model, test_loader)
            best = state["best_test_accuracy"]
            state["best_test_accuracy"] = max(best, record["test_accuracy"]) if best is not None else \
                record["test_accuracy"]
        state["history"].append(record)
        state["epoch"] = epoch
        progress.update(epoch * steps_per_epoch, record["loss"], logged=True)  # the epoch's mean loss
        if "test_accuracy" in record:
            progress.evaluated({"test_accuracy": record["test_accuracy"]})
        with run.new_checkpoint(epoch, keep=1) as folder:  # adapter + head, optimizer state, progress: one unit
            save_adapter(model, folder)
            torch.save(optimizer.state_dict(), folder / OPTIMIZER_NAME)
            (folder / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n")

    progress.end()
    save_adapter(model, run.path)  # the task's adapter, beside its result
    result = {"task": task, "group": next(g for g, ts in GROUPS.items() if task in ts),
              "test_accuracy": state["history"][-1].get("test_accuracy"),
              "best_test_accuracy_seen": state["best_test_accuracy"], "epochs": state["epoch"],
              "train_seconds": round(sum(h["seconds"] for h in state["history"]), 2),
              "adapter_parameters": report.adapter_total, "head_parameters": report.other_trainable,
              "history": state["history"], "config": experiment.record(task).settings}
    write_atomic(run.path / RESULT_NAME, json.dumps(result, indent=1) + "\n")
    run.finish(epochs=state["epoch"])
    return result

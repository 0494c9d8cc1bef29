"""Fine-tuning on top of the transformers ``Trainer``; data-parallel training under ``torchrun`` or
``accelerate launch`` (gloo on CPU, NCCL on GPU), where rank 0 alone writes.

What this adds: adapter-only checkpoints in lily-ssm's safetensors format that count only when complete
(:mod:`.run_folder`), resuming from the newest complete one of the same run, one run per folder (an
OS lock), a stop with an error at the first non-finite loss, gradient or weight, and a JSON-lines log
with loss, learning rate and tokens/s. Progress is one line (step/total, loss, learning rate, ETA;
:mod:`lily_ssm.utils.progress`) in place of the Trainer's printed dicts.

``data.protocol: paper`` trains as the published ``finetune.py`` does: its prompt, left padding, and
with a validation set the checkpoint with the lowest validation loss as the result
(``load_best_model_at_end``)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    DataCollatorForSeq2Seq,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from ..config.experiment import EXTENDABLE, NOT_FINGERPRINTED, ExperimentConfig
from ..data.commonsense import DataError, load_train_dataset, tokenize_row
from ..models.loading import load_model_and_tokenizer
from ..persistence import load_adapter, save_adapter
from ..tuners import apply_adapter
from ..tuners.report import parameter_report
from ..utils.atomic import append_line
from ..utils.compat import checkpointing_arguments
from ..utils.progress import ConsoleProgress, Progress, Snapshot
from ..utils.sections import ConfigError
from .guards import all_finite, diverged
from .run_folder import RunFolder, mark_checkpoint_complete

LOG_NAME = "train_log.jsonl"


class AdapterTrainer(Trainer):
    """``Trainer`` whose checkpoints hold only the adapter (plus the optimizer/scheduler state it keeps),
    marked complete when every file is written, and which stops at the first non-finite value."""

    def __init__(self, *args: Any, run_folder: RunFolder | None = None, log_path: str | Path | None = None,
                 keep_checkpoints: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_folder = run_folder
        self.log_path = Path(log_path) if log_path else None
        self.keep_checkpoints = keep_checkpoints  # rotation happens here, after a checkpoint is complete
        self._last_log: tuple[float, int] | None = None
        self._finite_losses: torch.Tensor | None = None
        self.add_callback(_StopOnNonFinite(self))
        for printer in (PrinterCallback, ProgressCallback):  # they print raw dicts; ShowProgress replaces them
            self.remove_callback(printer)

    def _write_log(self, record: dict[str, Any]) -> None:
        if self.log_path is not None and self.args.should_save:
            append_line(self.log_path, json.dumps(record))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)  # transformers' own rotation is off (save_total_limit=None)
        self.accelerator.wait_for_everyone()  # every rank's files (e.g. its RNG state) are in before the marker
        if self.args.should_save:
            run_dir = Path(self._get_output_dir(trial=trial))
            mark_checkpoint_complete(run_dir / f"checkpoint-{self.state.global_step}", self.state.global_step)
            if self.run_folder is not None:
                self.run_folder.rotate(self.keep_checkpoints, self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_adapter(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        load_adapter(self.accelerator.unwrap_model(self.model), best)
        self._write_log({"best_checkpoint": best, "best_eval_loss": self.state.best_metric})

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).all()  # checked once per optimizer step: no sync here
        self._finite_losses = finite if self._finite_losses is None else self._finite_losses & finite
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
        if self._last_log is not None and "loss" in logs and now > self._last_log[0]:
            logs["tokens_per_second"] = round((tokens - self._last_log[1]) / (now - self._last_log[0]), 1)
        if "loss" in logs or self._last_log is None:
            self._last_log = (now, tokens)
        super().log(logs, start_time)
        self._write_log({"step": self.state.global_step, "epoch": self.state.epoch, **logs})


class _StopOnNonFinite(TrainerCallback):
    """Raise :class:`~.guards.TrainingDivergedError` naming the step at the first non-finite loss (any micro-batch),
    gradient (before the optimizer step; under fp16 the loss scaler skips such steps by design) or adapter
    weight (after the step, before anything is saved)."""

    def __init__(self, trainer: AdapterTrainer) -> None:
        self.trainer = trainer

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.trainer.model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step, trainer = state.global_step + 1, self.trainer
        losses, trainer._finite_losses = trainer._finite_losses, None
        if losses is not None and not bool(losses):
            raise diverged(step, "the training loss is not finite")
        if not args.fp16 and not all_finite(p.grad for p in self._params()):
            raise diverged(step, "a gradient of the adapter is not finite")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not all_finite(self._params()):
            raise diverged(state.global_step, "an adapter weight is not finite after the optimizer step")


class ShowProgress(TrainerCallback):
    """Feeds a :class:`~lily_ssm.utils.progress.Progress` from the Trainer's events: every step, each
    logged loss and learning rate, each evaluation (the trackers of ``report_to`` get the same events)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress.begin(state.max_steps, state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress.update(state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.progress.update(state.global_step, logs["loss"], logs.get("learning_rate"), logged=True)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        shown = {k: v for k, v in (metrics or {}).items()
                 if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))}
        self.progress.evaluated(shown, state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress.end()


class _AlreadyTrained(Exception):
    """Raised at the start of a resumed run whose checkpoint already holds every step."""


class _ReportResume(TrainerCallback):
    """Say where a resumed run continues, once its checkpoint's state is loaded; and as transformers (5.x)
    takes one optimizer step before it checks ``max_steps``, stop a run whose checkpoint holds every step
    before that step (resuming from the final checkpoint would train one step too many)."""

    def __init__(self, checkpoint: str | None, log: Callable[[str], Any]) -> None:
        self.checkpoint, self.log = checkpoint, log

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.checkpoint is not None:
            self.log(f"resuming from {Path(self.checkpoint).name} (step {state.global_step} of {state.max_steps})")
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise _AlreadyTrained


def training_seconds(log_path: str | Path) -> float:
    """Training wall time recorded in a ``train_log.jsonl``, summed over every run that appended to it
    (each run starts with a ``run_start`` line and counts up to its last ``train_runtime``)."""
    path = Path(log_path)
    runs: list[float] = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        record = json.loads(line)
        if record.get("run_start") or not runs:
            runs.append(0.0)
        if "train_runtime" in record:
            runs[-1] = max(runs[-1], float(record["train_runtime"]))
    return sum(runs)


def accumulation_steps(config: ExperimentConfig, world: int | None = None) -> int:
    """Micro-batches per optimizer step, so that ``micro_batch_size x steps x processes = batch_size``."""
    training = config.training
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    if training.batch_size % (training.micro_batch_size * world):
        raise ConfigError(f"{config.source}: training.batch_size={training.batch_size} is not a multiple of "
                          f"training.micro_batch_size={training.micro_batch_size} x {world} process(es); the "
                          "effective batch would silently change")
    return training.batch_size // (training.micro_batch_size * world)


def _training_arguments(config: ExperimentConfig, has_eval: bool) -> TrainingArguments:
    training = config.training
    best_at_end = config.data.protocol == "paper" and has_eval
    if best_at_end and training.save_steps % training.eval_steps:
        raise ConfigError(f"{config.source}: data.protocol: paper keeps the checkpoint with the lowest validation "
                          f"loss, so training.save_steps={training.save_steps} must be a multiple of "
                          f"training.eval_steps={training.eval_steps} (the published runs use 200 and 200)")
    accumulation = accumulation_steps(config)
    return TrainingArguments(
        output_dir=training.output_dir,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.micro_batch_size,
        per_device_eval_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        warmup_steps=training.warmup_steps,
        lr_scheduler_type=training.lr_scheduler,
        logging_steps=training.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=training.eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=None,  # AdapterTrainer rotates, once a checkpoint is complete
        load_best_model_at_end=best_at_end,
        metric_for_best_model="eval_loss" if best_at_end else None,
        seed=training.seed,
        bf16=training.bf16,
        fp16=training.fp16,
        **checkpointing_arguments(training.gradient_checkpointing),
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,  # ShowProgress draws the progress (run_training)
        report_to=training.report_to,  # TensorBoard: <output_dir>/runs/ unless TENSORBOARD_LOGGING_DIR is set
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also makes accelerate set up gloo under torchrun on CPU
        ddp_find_unused_parameters=False,
    )


def training_collator(tokenizer: Any, protocol: str) -> DataCollatorForSeq2Seq:
    """Batches padded to a multiple of 8 (labels with -100): on the left for ``paper`` (as the published
    ``finetune.py``), on the right for ``clean``."""
    tokenizer.padding_side = "left" if protocol == "paper" else "right"  # the collator pads labels alike
    return DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)


def _on_rank_zero(args: TrainingArguments, work: Callable[[], Any]) -> Any:
    """Run ``work`` on the main process only and give every process its result, or raise its error on
    every process (so no rank waits forever for one that failed)."""
    if args.world_size <= 1:
        return work()
    import torch.distributed as dist

    outcome: list[Any] = [None]
    if args.process_index == 0:
        try:
            outcome = [("ok", work())]
        except Exception as exc:  # re-raised below, on every rank
            outcome = [("error", exc)]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def count_untrained_rows(labels: list[list[int]]) -> int:
    """Rows with no token to predict (labels[0] is never a target): their response was cut away."""
    return sum(not any(label != -100 for label in row[1:]) for row in labels)


def _check_targets(splits: Any, config: ExperimentConfig, log: Any) -> None:
    data = config.data
    for name in splits:
        empty, total = count_untrained_rows(splits[name]["labels"]), len(splits[name])
        if not empty:
            continue
        why = (f"{empty} of {total} {name} rows have no response token left within data.cutoff_len={data.cutoff_len}"
               + (" (train_on_inputs: false masks their prompt)" if not data.train_on_inputs else ""))
        if name == "train" and empty == total:
            raise DataError(f"{data.train_file}: {why}, so training would learn nothing; raise data.cutoff_len")
        log(f"warning: {why}; they add nothing to the {'loss' if name == 'train' else 'validation loss'}")


def run_training(config: ExperimentConfig, log: Any = print,
                 show_progress: Callable[[Snapshot], None] | None = None) -> dict[str, Any]:
    """Load the base model, inject the adapter, fine-tune, and save the final adapter to
    ``training.output_dir``. Returns the trainer's metrics and where things were written.

    Every input is checked first (:meth:`ExperimentConfig.check_inputs`), then the folder: by default
    (``training.resume: auto``) a rerun of the same run continues from its newest complete checkpoint, and a
    finished one returns at once (``finished_earlier``: true, ``model`` None) with nothing loaded (see
    :meth:`~lily_ssm.train.run_folder.RunFolder.prepare`). The folder is locked for the run's whole life;
    under ``torchrun`` only rank 0 writes.

    Progress goes to ``show_progress`` if given, else (with ``training.progress_bar``) to a
    :class:`~lily_ssm.utils.progress.ConsoleProgress` whose plain lines go through ``log``."""
    adapter_config = config.adapter_config()
    config.check_inputs()  # nothing below may fail on a missing input (or a Hub id offline) once the folder is touched
    data, training = config.data, config.training
    args = _training_arguments(config, data.val_set_size > 0)  # under torchrun: joins the process group
    main = args.process_index == 0
    log = log if main else (lambda *_: None)
    out = Path(training.output_dir)
    record = config.record()
    run = RunFolder(out, record.fingerprint(NOT_FINGERPRINTED), source=config.source, extendable=EXTENDABLE,
                    outputs=("adapter_config.json", LOG_NAME), log=log)
    finished = _on_rank_zero(args, lambda: run.finished(training.resume, training.overwrite))
    if finished is not None:
        step = finished.get("step")
        log(f"{out} holds this run, already finished ({step} steps): adapter {out}/, log {out / LOG_NAME}; "
            "set training.overwrite: true to train it again")
        return {"metrics": {}, "adapter": str(out), "log": str(out / LOG_NAME), "main_process": main,
                "global_step": step, "model": None, "tokenizer": None, "finished_earlier": True}
    splits = load_train_dataset(data.train_file, data.val_set_size, training.seed)  # bad rows fail here, too
    with contextlib.ExitStack() as stack:
        def prepare() -> str | None:
            stack.enter_context(run.lock())
            checkpoint = run.prepare(training.resume, training.overwrite)
            record.write(out)
            return str(checkpoint) if checkpoint else None

        checkpoint = _on_rank_zero(args, prepare)  # before the model loads: a refused folder costs nothing
        model, tokenizer = load_model_and_tokenizer(config.model.name_or_path, config.model.dtype,
                                                    config.model.device_map, config.model.tokenizer,
                                                    config.model.trust_remote_code)
        set_seed(training.seed)  # the adapter's initial weights are part of the run
        apply_adapter(model, adapter_config)
        log(str(parameter_report(model)))

        columns = splits["train"].column_names
        splits = splits.map(lambda row: tokenize_row(row, tokenizer, data.cutoff_len, data.train_on_inputs,
                                                     data.add_eos, data.protocol), remove_columns=columns)
        _check_targets(splits, config, log)
        trainer = AdapterTrainer(
            model=model,
            args=args,
            train_dataset=splits["train"],
            eval_dataset=splits.get("validation"),
            data_collator=training_collator(tokenizer, data.protocol),
            processing_class=tokenizer,
            run_folder=run,
            log_path=out / LOG_NAME,
            keep_checkpoints=training.save_total_limit,
        )
        for engine, enabled in (("FSDP", trainer.is_fsdp_enabled), ("DEEPSPEED", trainer.is_deepspeed_enabled)):
            if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() == "true" and not enabled:
                log(f"warning: accelerate was asked for {engine} (ACCELERATE_USE_{engine}), but the Trainer runs "
                    "plain data parallelism (DDP): every process holds the whole model")
        trainer._write_log({"run_start": True, "resume_from": checkpoint})  # where this run's records begin
        trainer.add_callback(_ReportResume(checkpoint, log))
        if show_progress is None and training.progress_bar:
            show_progress = ConsoleProgress(log=log)
        if show_progress is not None and main:
            trainer.add_callback(ShowProgress(Progress("train", show_progress)))
        try:
            metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
        except _AlreadyTrained:
            metrics = {"train_runtime": 0.0}  # the resume line said step M of M: nothing left to train
        trainer.save_model(str(out))
        if main:
            run.finish(step=trainer.state.global_step)
    return {"metrics": metrics, "adapter": str(out), "log": str(out / LOG_NAME), "main_process": main,
            "global_step": trainer.state.global_step, "model": model, "tokenizer": tokenizer}

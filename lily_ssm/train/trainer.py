"""Fine-tuning on top of the transformers ``Trainer``: DDP / FSDP / DeepSpeed via ``torchrun`` or
``accelerate launch`` need no code here. What this adds: adapter-only checkpoints in lily-ssm's
safetensors format, resuming from them, and a JSON-lines log with loss, learning rate and tokens/s.

``data.protocol: paper`` trains as the published ``finetune.py`` does: its prompt, left padding, and
with a validation set the checkpoint with the lowest validation loss as the result
(``load_best_model_at_end``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ..data.commonsense import load_train_dataset, tokenize_row
from ..models.loading import load_model_and_tokenizer
from ..persistence import load_adapter, save_adapter
from ..report import parameter_report
from ..tuners import apply_adapter
from ..utils.atomic import write_atomic
from .config import EXPERIMENT_NAME, ConfigError, ExperimentConfig

LOG_NAME = "train_log.jsonl"


class AdapterTrainer(Trainer):
    """``Trainer`` whose checkpoints hold only the adapter (plus the optimizer/scheduler state it keeps)."""

    def __init__(self, *args: Any, log_path: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_path = Path(log_path) if log_path else None
        self._last_log: tuple[float, int] | None = None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_adapter(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        load_adapter(self.accelerator.unwrap_model(self.model), best)
        if self.log_path is not None and self.args.should_save:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"best_checkpoint": best, "best_eval_loss": self.state.best_metric}) + "\n")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
        if self._last_log is not None and "loss" in logs and now > self._last_log[0]:
            logs["tokens_per_second"] = round((tokens - self._last_log[1]) / (now - self._last_log[0]), 1)
        if "loss" in logs or self._last_log is None:
            self._last_log = (now, tokens)
        super().log(logs, start_time)
        if self.log_path is not None and self.args.should_save:
            record = {"step": self.state.global_step, "epoch": self.state.epoch, **logs}
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


class _AlreadyTrained(Exception):
    """Raised at the start of a resumed run whose checkpoint already holds every step."""


class _StopWhenAlreadyTrained(TrainerCallback):
    """transformers (5.x) takes one optimizer step before it checks ``max_steps``, so resuming from the
    final checkpoint would train one step too many; stop such a run before its first step."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
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


def _training_arguments(config: ExperimentConfig, has_eval: bool) -> TrainingArguments:
    t = config.training
    best_at_end = config.data.protocol == "paper" and has_eval
    if best_at_end and t.save_steps % t.eval_steps:
        raise ConfigError(f"{config.source}: data.protocol: paper keeps the checkpoint with the lowest validation "
                          f"loss, so training.save_steps={t.save_steps} must be a multiple of training.eval_steps="
                          f"{t.eval_steps} (the published runs use 200 and 200)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if t.batch_size % (t.micro_batch_size * world):
        raise ConfigError(f"{config.source}: training.batch_size={t.batch_size} is not a multiple of "
                          f"training.micro_batch_size={t.micro_batch_size} x {world} process(es); the "
                          "effective batch would silently change")
    accumulation = t.batch_size // (t.micro_batch_size * world)
    return TrainingArguments(
        output_dir=t.output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=best_at_end,
        metric_for_best_model="eval_loss" if best_at_end else None,
        seed=t.seed,
        bf16=t.bf16,
        fp16=t.fp16,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not t.progress_bar,
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def training_collator(tokenizer: Any, protocol: str) -> DataCollatorForSeq2Seq:
    """Batches padded to a multiple of 8 (labels with -100): on the left for ``paper`` (as the published
    ``finetune.py``), on the right for ``clean``."""
    tokenizer.padding_side = "left" if protocol == "paper" else "right"  # the collator pads labels alike
    return DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)


def _resume_checkpoint(config: ExperimentConfig) -> str | None:
    resume = config.training.resume
    if resume is False or resume is None:
        return None
    if resume is True:
        folder = config.training.output_dir
        last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
        return last  # nothing saved yet: start from scratch
    if not os.path.isdir(str(resume)):
        raise ConfigError(f"{config.source}: training.resume={resume!r} is not a checkpoint folder")
    return str(resume)


def run_training(config: ExperimentConfig, log: Any = print) -> dict[str, Any]:
    """Load the base model, inject the adapter, fine-tune, and save the final adapter to
    ``training.output_dir``. Returns the trainer's metrics and where things were written."""
    adapter_config = config.adapter_config()
    m = config.model
    model, tokenizer = load_model_and_tokenizer(m.name_or_path, m.dtype, m.device_map, m.tokenizer,
                                                m.trust_remote_code)
    set_seed(config.training.seed)  # the adapter's initial weights are part of the run
    apply_adapter(model, adapter_config)
    log(str(parameter_report(model)))

    d = config.data
    splits = load_train_dataset(d.train_file, d.val_set_size, config.training.seed)
    columns = splits["train"].column_names
    splits = splits.map(lambda row: tokenize_row(row, tokenizer, d.cutoff_len, d.train_on_inputs, d.add_eos,
                                                 d.protocol), remove_columns=columns)
    out = Path(config.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / EXPERIMENT_NAME, yaml.safe_dump(config.to_dict(), sort_keys=False))

    trainer = AdapterTrainer(
        model=model,
        args=_training_arguments(config, "validation" in splits),
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        data_collator=training_collator(tokenizer, d.protocol),
        processing_class=tokenizer,
        log_path=out / LOG_NAME,
    )
    checkpoint = _resume_checkpoint(config)
    if trainer.args.should_save:  # mark where this run's records begin
        with open(out / LOG_NAME, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"run_start": True, "resume_from": checkpoint}) + "\n")
    trainer.add_callback(_StopWhenAlreadyTrained())
    try:
        metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    except _AlreadyTrained:
        log(f"{checkpoint} already holds all {trainer.state.max_steps} steps; nothing left to train")
        metrics = {"train_runtime": 0.0}
    trainer.save_model(str(out))
    return {"metrics": metrics, "adapter": str(out), "log": str(out / LOG_NAME),
            "global_step": trainer.state.global_step, "model": model, "tokenizer": tokenizer}

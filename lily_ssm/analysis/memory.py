"""What a training step keeps in memory: saved activations, measured, and the planned peak of a run.

:func:`saved_bytes` runs a forward pass under ``torch.autograd.graph.saved_tensors_hooks`` and adds up
every tensor autograd keeps for backward (each storage once, parameters excluded). On the meta device
this costs no memory and no compute, so the real shapes of a 7B model can be measured on a laptop.
:func:`plan_training_memory` turns that into the planned peak of ``lily-ssm train``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.loading import load_model_config, meta_model

GIB = 1024 ** 3
_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}

def saved_bytes(fn: Callable[[], Any], exclude: list[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs (each storage once); the
    storages of ``exclude`` (e.g. the parameters) do not count."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in skip:
            seen[storage._cdata] = max(seen.get(storage._cdata, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_bytes(model_config: Any, adapter_config: Any, batch: int, tokens: int, dtype: torch.dtype,
                     gpu: bool = True, fused: bool = True) -> tuple[int, int]:
    """``(base, per layer)`` bytes saved for backward by one training forward of ``batch x tokens``,
    measured on the meta device with 1- and 2-layer copies of the architecture (the adapter's
    activations do not depend on its expert counts, so ``num_A`` is 1 there). ``gpu`` measures the
    CUDA-kernel path (with :mod:`lily_ssm.ops.standins`); ``fused=False`` the unfused mixers."""
    from ..modules.recompute import unfused
    from ..ops.standins import gpu_structure
    from ..tuners import apply_adapter
    from ..tuners.lily.config import LilyConfig

    config = adapter_config
    if isinstance(config, LilyConfig):  # one A expert fits any layer count
        config = dataclasses.replace(config, num_A=1, stride_A=None,
                              overrides={k: {**v, "num_A": 1} for k, v in config.overrides.items()})
    totals = []
    for count in (1, 2):
        cfg = copy.deepcopy(model_config)
        cfg.num_hidden_layers = count
        model = meta_model(cfg).to(dtype)
        apply_adapter(model, config)
        model.train()
        ids = torch.zeros(batch, tokens, dtype=torch.long, device="meta")

        def step(model=model, ids=ids) -> None:
            model(input_ids=ids, labels=ids, use_cache=False)

        with gpu_structure(("meta",)) if gpu else contextlib.nullcontext(), \
                contextlib.nullcontext() if fused else unfused():
            totals.append(saved_bytes(step, exclude=list(model.parameters())))
    per_layer = totals[1] - totals[0]
    return totals[0] - per_layer, per_layer


@dataclass
class MemoryPlan:
    """The planned peak of a training run on one GPU, by term (bytes)."""

    terms: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def table(self) -> str:
        rows = [f"  {name:<58} {value / GIB:8.2f} GiB" for name, value in self.terms.items()]
        return "\n".join(["planned peak memory (one process):", *rows, f"  {'total':<58} {self.total / GIB:8.2f} GiB",
                          *(f"  note: {n}" for n in self.notes)])


def plan_training_memory(experiment: Any) -> MemoryPlan:
    """Planned peak memory of ``lily-ssm train`` for ``experiment`` (an ExperimentConfig), per process:
    frozen weights + adapter weights, gradients and AdamW state (fp32) + the activations one
    micro-batch of ``cutoff_len`` tokens saves (measured on the meta device, on the CUDA-kernel path,
    per layer × layers) + the logits and their fp32 copy for the loss + the activations of the one
    layer whose core is recomputed during backward. CUDA's context and the allocator's fragmentation
    are not in it: keep about 2 GiB of a GPU's memory beyond the plan."""
    from ..models.loading import parse_dtype
    from ..tuners import apply_adapter
    from ..tuners.report import parameter_report

    model_section, training = experiment.model, experiment.training
    adapter_config = experiment.adapter_config()
    model_config = load_model_config(model_section.name_or_path, model_section.trust_remote_code)
    dtype = parse_dtype(model_section.dtype)
    dtype = torch.float32 if dtype in (None, "auto") else dtype
    full = meta_model(model_config, model_section.trust_remote_code).to(dtype)
    apply_adapter(full, adapter_config)
    adapter = parameter_report(full).adapter_total
    frozen = sum(p.numel() for n, p in full.named_parameters() if "lily_ssm_adapter" not in n)
    layers = model_config.num_hidden_layers
    batch, tokens = training.micro_batch_size, experiment.data.cutoff_len
    base, per_layer = activation_bytes(model_config, adapter_config, batch, tokens, dtype)
    recomputed = activation_bytes(model_config, adapter_config, batch, tokens, dtype, fused=False)[1]
    vocab, hidden = model_config.vocab_size, model_config.hidden_size
    size = _DTYPE_BYTES[dtype]
    notes = [f"saved activations: {per_layer / (batch * tokens) / 1024:.1f} KiB per token per layer, measured on the "
             f"meta device for {batch} x {tokens} tokens"]
    if training.gradient_checkpointing:  # each block keeps its input; one block is recomputed at a time
        activations = layers * batch * tokens * hidden * size + base
        notes.append("gradient checkpointing: each block keeps only its input")
    else:
        activations = base + layers * per_layer
    terms = {
        f"frozen weights ({frozen / 1e9:.2f}B x {size} bytes)": frozen * size,
        "adapter weights, gradients, AdamW state (fp32)": adapter * 4 * 4,
        f"saved activations ({layers} layers)": activations,
        "logits and their fp32 copy for the loss": batch * tokens * vocab * (size + 4),
        "one layer recomputed in backward (its unfused activations)": recomputed,
    }
    return MemoryPlan(terms, notes)

"""Where the supported transformers versions (5.15 and later) differ, in one place: the SSM cache's API, the name of
gradient checkpointing, and the Falcon-Mamba mixer's norm modules.

transformers 5.21 added ``get_conv_state`` / ``get_recurrent_state`` / ``is_recording_past`` to the cache. From 5.15 to
5.20 the same states live on the cache's per-layer objects (``layers[i].conv_states[0]``, valid once
``has_previous_state[0]`` is set); writing (``update_conv_state`` with ``conv_kernel_size``, ``update_recurrent_state``)
is the same throughout. 5.23 renamed gradient checkpointing to activation checkpointing. Before 5.15 the
Falcon-Mamba mixer had no norm modules, so a module-calling forward would silently skip its norms. Before 5.18
transformers could not read the hub's ViT checkpoints (their keys predate ViT's renamed modules). Early 5.x Mamba-2,
Bamba and GraniteMoeHybrid gated norms normalise over all of d_inner, not per group of ``n_groups`` as mamba-ssm (and
later transformers) do: a different function whenever ``n_groups`` > 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LayerStates:
    """The convolution window and recurrent state of layer ``layer_idx`` in ``cache``."""

    def __init__(self, cache: Any, layer_idx: int) -> None:
        self.cache, self.layer_idx = cache, layer_idx
        if hasattr(cache, "get_conv_state"):  # transformers >= 5.21
            self.conv = cache.get_conv_state(layer_idx)
            self.recurrent = cache.get_recurrent_state(layer_idx)
            self.recording_past = bool(cache.is_recording_past(layer_idx))
            return
        layers = getattr(cache, "layers", None)
        layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
        started = layer is not None and bool(getattr(layer, "has_previous_state", {}).get(0, False))
        self.conv = layer.conv_states[0] if started else None
        self.recurrent = layer.recurrent_states[0] if started else None
        self.recording_past = bool(getattr(layer, "record_past", False))

    def decoding(self, seq_len: int) -> bool:
        """Whether this call continues from the cached states one token at a time."""
        return self.conv is not None and seq_len == 1 and not self.recording_past

    def update_conv(self, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        """Store ``x``'s convolution window and return ``x`` with the cached window prepended."""
        return self.cache.update_conv_state(x, self.layer_idx, conv_kernel_size=kernel_size)

    def update_recurrent(self, state: torch.Tensor) -> None:
        self.cache.update_recurrent_state(state, self.layer_idx)


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """``TrainingArguments`` keywords that switch (non-reentrant) activation checkpointing ``enabled``."""
    from transformers import TrainingArguments

    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"  # before transformers 5.23
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on (non-reentrant) activation checkpointing in a transformers model."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:  # before transformers 5.23
        model.gradient_checkpointing_enable({"use_reentrant": False})


def check_mixer(mixer: nn.Module) -> None:
    """Refuse a mixer whose transformers version lacks the modules lily-ssm's forward calls."""
    if type(mixer).__name__ == "FalconMambaMixer" and not hasattr(mixer, "dt_layernorm"):
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__}'s FalconMambaMixer has no dt_layernorm / "
                           "b_layernorm / c_layernorm modules, so lily-ssm's forward would skip its norms; lily-ssm "
                           "supports transformers 5.15 and later (pip install -U 'transformers>=5.15')")


def reads_legacy_vit_checkpoints() -> bool:
    """Whether transformers loads the hub's ViT checkpoints (``encoder.layer.N.attention.attention.query``, ...,
    saved without the ``vit.`` prefix) into ``ViTForImageClassification``'s renamed modules: from 5.18."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release >= (5, 18)


def gated_rms_norm(norm: nn.Module, y: torch.Tensor, gate: torch.Tensor, n_groups: int) -> torch.Tensor:
    """A Mamba-2 mixer's gated RMS norm, ``norm(y, gate)``, normalising per group of ``n_groups`` as mamba-ssm's
    ``RMSNormGated(group_size=d_inner / ngroups)`` does, also where the installed transformers' norm has no groups."""
    if n_groups == 1 or hasattr(norm, "group_size") or hasattr(norm, "n_groups"):
        return norm(y, gate)
    dtype = y.dtype
    h = y.float() * nn.functional.silu(gate.float())
    h = h.unflatten(-1, (n_groups, -1))
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).flatten(-2)
    return norm.weight * h.to(dtype)

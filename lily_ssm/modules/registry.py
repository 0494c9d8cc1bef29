"""Which transformers mixers lily-ssm owns, and giving them its module-calling forwards (docs/design.md §3).

transformers' Mamba-1 mixers compute ``dt_proj.weight @ time_step`` and its fused CUDA paths take projection
weights instead of calling the modules, so adapters on them would silently do nothing. Every mixer class
named here gets lily-ssm's forward instead: same function, every projection called as a module.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

from torch import nn

from ..utils.compat import check_mixer
from .mamba2_mixer import mamba2_mixer_forward
from .mamba_mixer import mamba_mixer_forward

# Mixers whose in_proj is [x, z] and whose x_proj is [dt, B, C] (transformers' and lily-ssm's Vim).
MAMBA1_MIXERS = ("MambaMixer", "FalconMambaMixer", "JambaMambaMixer", "VimMixer")
# transformers' Mamba-2 mixers: in_proj is [z, x, B, C, dt] (after any MLP halves), no x_proj or dt_proj.
MAMBA2_MIXERS = ("Mamba2Mixer", "BambaMixer", "FalconH1Mixer", "NemotronHMamba2Mixer", "Zamba2MambaMixer",
                 "GraniteMoeHybridMambaLayer")
# transformers' linear-recurrent layers of the hybrids (gated delta rule; LFM2's gated short convolution). They call
# every projection as a module on every path (their kernels, flash-linear-attention and causal-conv1d, take the
# projections' outputs, not their weights), so lily-ssm leaves their forwards alone; the liveness check
# (lily_ssm.tuners.liveness) still proves on each mode's first forward that every adapter ran.
GATED_DELTA_LAYERS = ("Qwen3NextGatedDeltaNet", "Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet",
                      "OlmoHybridGatedDeltaNet", "KimiLinearDeltaAttention")
SHORT_CONV_LAYERS = ("Lfm2ShortConv", "Lfm2MoeShortConv")


def owned_forward(module: nn.Module) -> Callable[..., Any] | None:
    """The module-calling forward lily-ssm has for ``module``'s class (a transformers Mamba-1 or Mamba-2
    mixer), or None."""
    if not type(module).__module__.startswith("transformers."):
        return None
    name = type(module).__name__
    return mamba_mixer_forward if name in MAMBA1_MIXERS else mamba2_mixer_forward if name in MAMBA2_MIXERS else None


def patch_mamba_mixers(model: nn.Module) -> int:
    """Give every transformers Mamba-1 / Mamba-2 mixer in ``model`` the module-calling forward; returns how
    many."""
    count = 0
    for module in model.modules():
        forward = owned_forward(module)
        if forward is not None and "forward" not in module.__dict__:
            check_mixer(module)
            module.forward = MethodType(forward, module)
            count += 1
    return count


def unpatch_mamba_mixers(model: nn.Module) -> None:
    """Give the mixers :func:`patch_mamba_mixers` patched their own forward back."""
    for module in model.modules():
        if owned_forward(module) is not None and "forward" in module.__dict__:
            del module.forward

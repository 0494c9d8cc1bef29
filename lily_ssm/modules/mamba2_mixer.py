"""A Mamba-2 mixer forward that calls in_proj and out_proj as modules on every path (docs/design.md §3).

transformers' Mamba-2 family (Mamba2, Bamba, Falcon-H1, Nemotron-H, Zamba2, GraniteMoeHybrid) shares one
mixer forward; on the CUDA training path it hands ``out_proj.weight`` to the fused
``mamba_split_conv1d_scan_combined``, so an out_proj adapter gets no output and no gradient.
:func:`mamba2_mixer_forward` computes the same function with ``in_proj`` and ``out_proj`` always called
as modules: in_proj → convolution over ``[x, B, C]`` → the SSD scan (:mod:`lily_ssm.ops.ssd`:
``mamba_chunk_scan_combined`` on CUDA, a chunked PyTorch scan elsewhere) → gated RMS norm → out_proj.
in_proj's output is ``[z, x, B, C, dt]``, the parts an adapter may target
(:func:`lily_ssm.tuners.targets.mamba2_in_proj_parts`). Falcon-H1's multipliers
(``ssm_in_multiplier``, ``mup_vector``) and its optional norm are kept. With gradients on, the core
(convolution, scan, norm) is fused: only in_proj's output is kept for backward (:mod:`.recompute`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import ssd
from ..utils.compat import LayerStates, gated_rms_norm
from .padding import mask_padding
from .projection import read_parameters
from .recompute import fused_enabled, recompute


def _gate_and_norm(mixer: nn.Module, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    if getattr(mixer, "mamba_rms_norm", True):
        return gated_rms_norm(mixer.norm, y, gate, mixer.n_groups)
    return y * F.silu(gate)  # Falcon-H1 without its norm


def mamba2_mixer_forward(self: nn.Module, hidden_states: torch.Tensor, cache: Any = None,
                         attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """Forward of a transformers Mamba-2 mixer with in_proj and out_proj called as modules."""
    if cache is None:
        cache = kwargs.get("cache_params")
    batch, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    states = LayerStates(cache, self.layer_idx) if cache is not None else None
    d, gn, h, p = self.intermediate_size, self.n_groups * self.ssm_state_size, self.num_heads, self.head_dim

    hidden_states = mask_padding(hidden_states, attention_mask)
    if hasattr(self, "ssm_in_multiplier"):  # Falcon-H1's μP multipliers
        hidden_states = hidden_states * self.ssm_in_multiplier
    projected = self.in_proj(hidden_states)
    if hasattr(self, "mup_vector"):
        projected = projected * self.mup_vector
    gate, xBC, dt = projected[..., projected.shape[-1] - (2 * d + 2 * gn + h):].split([d, d + 2 * gn, h], dim=-1)
    A = -torch.exp(self.A_log.float())
    conv_weight = self.conv1d.weight.squeeze(1)

    if states is not None and states.decoding(seq_len):
        xBC = ops.causal_conv1d_update(xBC.transpose(1, 2), states.conv, conv_weight, self.conv1d.bias,
                                       activation=self.activation)
        xBC = mask_padding(xBC.transpose(1, 2), attention_mask)
        x, B, C = xBC[:, 0].split([d, gn, gn], dim=-1)
        y = ssd.ssd_state_update(
            states.recurrent, x.reshape(batch, h, p), dt[:, 0, :, None].expand(-1, -1, p),
            A[:, None, None].expand(-1, p, self.ssm_state_size), B.reshape(batch, self.n_groups, -1),
            C.reshape(batch, self.n_groups, -1), self.D[:, None].expand(-1, p),
            dt_bias=self.dt_bias[:, None].expand(-1, p), dt_softplus=True,
        ).reshape(batch, 1, d)
        return self.out_proj(_gate_and_norm(self, y, gate).to(dtype))

    xBC = xBC.transpose(1, 2)
    if states is not None:  # prefill or chunked continuation: the cache prepends its window
        xBC = states.update_conv(xBC, self.conv_kernel_size)
    initial = states.recurrent.clone() if states is not None and states.recurrent is not None else None

    def core(xBC: torch.Tensor, gate: torch.Tensor, dt: torch.Tensor,
             initial: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        u = ops.causal_conv1d(xBC, conv_weight, self.conv1d.bias, activation=self.activation)[..., -seq_len:]
        x, B, C = mask_padding(u.transpose(1, 2), attention_mask).split([d, gn, gn], dim=-1)
        result = ssd.ssd_scan(
            x.reshape(batch, seq_len, h, p), dt, A, B.reshape(batch, seq_len, self.n_groups, -1),
            C.reshape(batch, seq_len, self.n_groups, -1), self.chunk_size, D=self.D, dt_bias=self.dt_bias,
            initial_states=initial, dt_softplus=True, dt_limit=tuple(self.time_step_limit),
            return_final_states=cache is not None,
        )
        y, last = result if cache is not None else (result, None)
        return _gate_and_norm(self, y.reshape(batch, seq_len, d), gate).to(dtype), last

    inputs = (xBC, gate, dt) if initial is None else (xBC, gate, dt, initial)
    if fused_enabled():
        params = read_parameters([self.conv1d, self.norm], (self.A_log, self.D, self.dt_bias))
        y, last = recompute(core, inputs, params)
    else:
        y, last = core(*inputs)
    if states is not None:
        states.update_recurrent(last)
    return self.out_proj(y)

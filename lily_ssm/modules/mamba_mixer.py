"""A Mamba-1 mixer forward that calls every projection through its module (docs/design.md §3).

transformers' ``MambaMixer`` / ``FalconMambaMixer`` / ``JambaMambaMixer`` compute
``dt_proj.weight @ time_step`` and, on the kernel path, hand ``x_proj`` / ``dt_proj`` / ``out_proj`` weights
straight to a fused function, so adapters on those modules silently do nothing.
:func:`~lily_ssm.modules.registry.patch_mamba_mixers` swaps in :func:`mamba_mixer_forward` on every such
mixer: same math, same cache protocol, but ``in_proj``, ``x_proj``, ``dt_proj`` and ``out_proj`` are always
called, and the scan goes through :mod:`lily_ssm.ops` (CUDA kernels when present, PyTorch otherwise).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import ops
from ..utils.compat import LayerStates
from .padding import mask_padding
from .projection import linear_without_bias, read_parameters
from .recompute import fused_enabled, fused_scan


def mamba_mixer_forward(self: nn.Module, hidden_states: torch.Tensor, cache: Any = None,
                        attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """Forward of a transformers Mamba-1 mixer with every projection called as a module.

    With gradients on and no cache (training), the SSM core (convolution → x_proj → Δ → scan) is fused: the scan
    runs once, and only the in_proj output and the scan's own state are kept for backward, the rest is recomputed
    (:func:`~.recompute.fused_scan`), as ``mamba_inner_fn`` does.
    """
    if cache is None:
        cache = kwargs.get("cache_params")
    seq_len, dtype = hidden_states.shape[1], hidden_states.dtype
    states = LayerStates(cache, self.layer_idx) if cache is not None else None

    hidden_states = mask_padding(hidden_states, attention_mask)
    x, gate = self.in_proj(hidden_states).chunk(2, dim=-1)  # (b, t, d) each
    x = x.transpose(1, 2)
    conv_weight = self.conv1d.weight.squeeze(1)
    if states is not None and states.decoding(seq_len):
        x = ops.causal_conv1d_update(x, states.conv, conv_weight, self.conv1d.bias, activation=self.activation)
        x = mask_padding(x.transpose(1, 2), attention_mask)
        time_step, B, C, delta, delta_bias = _delta(self, x)
        y = ops.selective_state_update(
            states.recurrent, x[:, 0], delta[:, 0], -torch.exp(self.A_log.float()), B[:, 0], C[:, 0], self.D,
            z=gate[:, 0], dt_bias=delta_bias, dt_softplus=True,
        ).unsqueeze(1)
        return self.out_proj(y.to(dtype))

    if states is not None:  # prefill or chunked continuation: the cache prepends its window
        x = states.update_conv(x, self.conv_kernel_size)

    def scan_inputs(x: torch.Tensor, gate: torch.Tensor) -> tuple[Any, ...]:
        """Convolution → x_proj (→ norms) → Δ, through the modules: the scan's inputs in its layouts."""
        u = ops.causal_conv1d(x, conv_weight, self.conv1d.bias, activation=self.activation)[..., -seq_len:]
        u = mask_padding(u.transpose(1, 2), attention_mask)  # (b, t, d)
        _, B, C, delta, delta_bias = _delta(self, u)
        return (u.transpose(1, 2), delta.transpose(1, 2), -torch.exp(self.A_log.float()), B.transpose(1, 2),
                C.transpose(1, 2), self.D.float(), gate.transpose(1, 2), delta_bias)

    if fused_enabled() and states is None:  # training: the scan runs once, the rest is recomputed in backward
        y = fused_scan(scan_inputs, (x, gate), read_parameters(_core_modules(self), (self.A_log, self.D)))
    else:
        initial = states.recurrent.clone() if states is not None and states.recurrent is not None else None
        result = ops.selective_scan(*scan_inputs(x, gate), delta_softplus=True, return_last_state=states is not None,
                                    initial_state=initial)
        y, last = result if states is not None else (result, None)
        if states is not None:
            states.update_recurrent(last)
    return self.out_proj(y.transpose(1, 2).to(dtype))


def _core_modules(mixer: nn.Module) -> list[nn.Module]:
    names = ("conv1d", "x_proj", "dt_proj", "dt_layernorm", "b_layernorm", "c_layernorm")
    return [getattr(mixer, name) for name in names if hasattr(mixer, name)]


def _delta(mixer: nn.Module, u: torch.Tensor):
    """``x_proj`` (and Falcon-Mamba's RMS norms on Δ, B and C), then the adapted Δ with its bias apart."""
    time_step, B, C = torch.split(mixer.x_proj(u), [mixer.time_step_rank, mixer.ssm_state_size,
                                                   mixer.ssm_state_size], dim=-1)
    if hasattr(mixer, "dt_layernorm"):  # Falcon-Mamba: RMS norms on Δ, B and C before the scan
        time_step, B, C = mixer.dt_layernorm(time_step), mixer.b_layernorm(B), mixer.c_layernorm(C)
    delta, delta_bias = linear_without_bias(mixer.dt_proj, time_step)
    return time_step, B, C, delta, delta_bias.float() if delta_bias is not None else None

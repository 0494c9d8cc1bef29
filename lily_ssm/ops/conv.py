"""Depthwise causal 1-D convolution: dispatch to ``causal-conv1d`` on CUDA, PyTorch elsewhere.

Signatures follow ``causal_conv1d``: ``x (batch, dim, seqlen)``, ``weight (dim, width)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation in (None, "identity"):
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"activation={activation!r}; the causal convolution supports silu/swish or None")


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      activation: str | None = None) -> torch.Tensor:
    width = weight.shape[-1]
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])
    return _activate(out[..., : x.shape[-1]], activation).to(x.dtype)


def causal_conv1d_update_ref(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """Decoding steps as ``causal_conv1d_update`` computes them: ``x (batch, dim)`` (one token) or ``(batch, dim,
    seqlen)`` continues from ``conv_state (batch, dim, state_len)``, any ``state_len >= width - 1``, which is updated
    in place to the last ``state_len`` inputs. Returns ``x``'s shape."""
    width = weight.shape[-1]
    squeeze = x.dim() == 2
    step = x.unsqueeze(-1) if squeeze else x
    if step.dim() != 3 or conv_state.dim() != 3 or conv_state.shape[:2] != step.shape[:2]:
        raise ValueError(f"x of shape {tuple(x.shape)} and conv_state of shape {tuple(conv_state.shape)}: expected x "
                         "(batch, dim) or (batch, dim, seqlen) and conv_state (batch, dim, state_len)")
    if conv_state.shape[-1] < width - 1:
        raise ValueError(f"conv_state holds {conv_state.shape[-1]} positions; a width-{width} convolution needs at "
                         f"least {width - 1}")
    window = torch.cat([conv_state, step.to(conv_state.dtype)], dim=-1)  # (batch, dim, state_len + seqlen)
    conv_state.copy_(window[..., -conv_state.shape[-1]:])
    out = F.conv1d(window.to(weight.dtype), weight.unsqueeze(1), bias, groups=weight.shape[0])[..., -step.shape[-1]:]
    out = _activate(out, activation).to(x.dtype)
    return out.squeeze(-1) if squeeze else out


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None) -> torch.Tensor:
    kernel = kernels.usable("causal_conv1d_fn", x)
    if kernel is not None:
        return kernel(x, weight, bias, activation=activation)
    return causal_conv1d_ref(x, weight, bias, activation)


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    kernel = kernels.usable("causal_conv1d_update", x)
    if kernel is not None:
        return kernel(x, conv_state, weight, bias, activation=activation)
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)

"""Stand-ins for the CUDA kernels that keep for backward exactly what the kernels keep.

``selective_scan_fn`` (mamba_ssm) keeps ``u, delta, A, B, C, D, z, delta_bias``, its chunk states
``x`` (fp32, ``(batch, dim, ceil(L/2048), 2·state)``) and ``out`` (the scan output before gating, in
``u``'s dtype); ``causal_conv1d_fn`` keeps ``x, weight, bias``. The stand-ins compute with the PyTorch
references and save the same tensors, so the memory of the GPU path can be measured on a CPU or on
the meta device (:mod:`lily_ssm.analysis.memory`). They are for measuring, not for training: their
backward re-runs the reference under autograd.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import kernels
from .conv import causal_conv1d_ref, causal_conv1d_update_ref
from .scan import selective_scan_ref, selective_state_update_ref

_KERNEL_CHUNK = 2048  # selective_scan_cuda's chunk length


class _ScanStandin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        with torch.no_grad():
            out, last = selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus, True)
            out_z = out * torch.nn.functional.silu(z.float()).to(out.dtype) if z is not None else out
        chunks = -(-u.shape[-1] // _KERNEL_CHUNK)
        states = u.new_empty(u.shape[0], u.shape[1], chunks, 2 * A.shape[-1], dtype=torch.float32)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, out if z is not None else None)
        ctx.delta_softplus = delta_softplus
        ctx.mark_non_differentiable(last)
        return out_z, last

    @staticmethod
    def backward(ctx, grad, _):
        u, delta, A, B, C, D, z, delta_bias, _, _ = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                  for t in (u, delta, A, B, C, D, z, delta_bias)]
        with torch.enable_grad():
            out = selective_scan_ref(*inputs, delta_softplus=ctx.delta_softplus)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (*(next(found) if t is not None and t.requires_grad else None for t in inputs), None, None)


def selective_scan_standin(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """``selective_scan_fn``'s signature, results and saved tensors."""
    out, last = _ScanStandin.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return (out, last) if return_last_state else out


class ScanExtensionStandin:
    """``selective_scan_cuda``'s ``fwd`` / ``bwd``: the same results, and the same chunk states (``x``) and
    ungated output (``out``) saved, computed with the PyTorch reference."""

    @staticmethod
    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        with torch.no_grad():
            out, last = selective_scan_ref(u, delta, A, B[:, 0], C[:, 0], D, None, delta_bias, delta_softplus, True)
        states = u.new_zeros(u.shape[0], u.shape[1], -(-u.shape[-1] // _KERNEL_CHUNK), 2 * A.shape[-1],
                             dtype=torch.float32)
        states[:, :, -1, 1::2] = last
        if z is None:
            return out, states
        return out, states, out * torch.nn.functional.silu(z.float()).to(out.dtype)

    @staticmethod
    def bwd(u, delta, A, B, C, D, z, delta_bias, dout, states, out, dz, delta_softplus, recompute_out_z):
        inputs = [t.detach().requires_grad_(True) if t is not None else None
                  for t in (u, delta, A, B[:, 0], C[:, 0], D, z, delta_bias)]
        with torch.enable_grad():
            result = selective_scan_ref(*inputs, delta_softplus=delta_softplus)
        wanted = [t for t in inputs if t is not None]
        found = iter(torch.autograd.grad(result, wanted, dout))
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = (next(found) if t is not None else None for t in inputs)
        return (du, ddelta, dA, dB[:, None], dC[:, None], dD, ddelta_bias, *([dz] if z is not None else []))


class _ConvStandin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        ctx.save_for_backward(x, weight, bias)
        ctx.activation = activation
        with torch.no_grad():
            return causal_conv1d_ref(x, weight, bias, activation)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (x, weight, bias)]
        with torch.enable_grad():
            out = causal_conv1d_ref(*inputs, activation=ctx.activation)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (*(next(found) if t is not None and t.requires_grad else None for t in inputs), None)


def causal_conv1d_standin(x, weight, bias=None, activation=None):
    """``causal_conv1d_fn``'s signature, result and saved tensors."""
    return _ConvStandin.apply(x, weight, bias, activation)


@contextlib.contextmanager
def gpu_structure(devices: tuple[str, ...] = ("cpu", "meta")) -> Iterator[None]:
    """Inside the block, tensors on ``devices`` take the CUDA-kernel path with the stand-ins."""
    with kernels.override(devices, selective_scan_fn=selective_scan_standin, selective_scan_cuda=ScanExtensionStandin,
                          causal_conv1d_fn=causal_conv1d_standin, selective_state_update=selective_state_update_ref,
                          causal_conv1d_update=causal_conv1d_update_ref):
        yield


class _MambaInnerStandin(torch.autograd.Function):
    """What ``mamba_inner_fn`` (checkpoint_lvl=1) saves: xz, the conv / x_proj / dt_proj / out_proj
    weights, x_dbl, B and C (contiguous copies), A, D, delta_bias, the scan's chunk states and its
    output; the convolution output and Δ are recomputed in its backward."""

    @staticmethod
    def forward(ctx, xz, mixer):
        d, n, rank = mixer.intermediate_size, mixer.ssm_state_size, mixer.time_step_rank
        with torch.no_grad():
            x, z = xz.chunk(2, dim=1)
            u = causal_conv1d_ref(x, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, "silu")
            x_dbl = u.transpose(1, 2).reshape(-1, d) @ mixer.x_proj.weight.T
            B = x_dbl[:, rank:rank + n].contiguous()
            C = x_dbl[:, rank + n:].contiguous()
            out = u.clone()  # the scan output (before gating) has u's shape and dtype
        states = xz.new_empty(xz.shape[0], d, -(-xz.shape[-1] // 2048), 2 * n, dtype=torch.float32)
        weights = (mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight,
                   mixer.out_proj.weight, mixer.A_log, mixer.D, mixer.dt_proj.bias)
        ctx.save_for_backward(xz, x_dbl, B, C, states, out, *weights)
        return (out * z).transpose(1, 2) @ mixer.out_proj.weight.T

    @staticmethod
    def backward(ctx, grad):  # only the saved tensors are measured here
        raise NotImplementedError


def mamba_inner_standin(xz: torch.Tensor, mixer: torch.nn.Module) -> torch.Tensor:
    """The output of a Mamba-1 mixer's core and out_proj from ``xz``, saving for backward exactly what
    ``mamba_inner_fn`` (checkpoint_lvl=1) saves: for measuring the fused peer's memory (no backward)."""
    return _MambaInnerStandin.apply(xz, mixer)

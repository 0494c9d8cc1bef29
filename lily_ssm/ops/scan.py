"""The Mamba-1 selective scan: dispatch to ``mamba-ssm`` on CUDA, a PyTorch reference elsewhere (docs/design.md §8).

Signatures and layouts follow ``mamba_ssm``: ``u, delta, z (batch, dim, seqlen)``, ``A (dim, state)``,
``B, C (batch, state, seqlen)``, ``D, delta_bias (dim,)``. The recurrence, per channel d and step t::

    Δ = softplus(delta + delta_bias)        h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
    y_t = C_t · h_t + D u_t                  out = y · silu(z)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels, scan_chunked
from .scan_chunked import selective_scan_chunked


def _discretise(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[..., None]
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                       delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False, initial_state: torch.Tensor | None = None):
    """Sequential reference (the oracle): one step per position, fp32 state."""
    dtype = u.dtype
    delta = _discretise(delta, delta_bias, delta_softplus)  # (b, d, t)
    u_f, A_f, B_f, C_f = u.float(), A.float(), B.float(), C.float()
    batch, dim, length = u.shape
    state = (torch.zeros(batch, dim, A.shape[-1], device=u.device, dtype=torch.float32)
             if initial_state is None else initial_state.float())
    outputs = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A_f)  # (b, d, n)
        state = decay * state + (delta[:, :, t] * u_f[:, :, t])[..., None] * B_f[:, None, :, t]
        outputs.append((state * C_f[:, None, :, t]).sum(-1))
    y = torch.stack(outputs, dim=-1) if outputs else u_f.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u_f * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, state) if return_last_state else y


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, initial_state: torch.Tensor | None = None):
    """The one dispatch point for full-sequence scans (training, evaluation, prefill).

    CUDA kernel when importable and ``u`` is on CUDA (it cannot start from a state); otherwise the
    chunked PyTorch scan (input-dependent ``B``/``C``), or the sequential reference for other layouts.
    """
    kernel = kernels.usable("selective_scan_fn", u) if initial_state is None else None
    if kernel is not None:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if B.dim() == 3 and C.dim() == 3:
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                      initial_state)
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              initial_state)


def _kernel_layout(u, delta, B, C, z):
    """What ``selective_scan_cuda`` takes: contiguous time axes, ``B`` / ``C`` with a group axis."""
    def last_contiguous(t):
        return t if t is None or t.stride(-1) == 1 else t.contiguous()

    return (last_contiguous(u), last_contiguous(delta), B.unsqueeze(1).contiguous(), C.unsqueeze(1).contiguous(),
            last_contiguous(z))


def selective_scan_forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                           delta_bias: torch.Tensor | None = None, delta_softplus: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The scan's forward for a caller that runs its own backward (the fused SSM core,
    :mod:`lily_ssm.modules.recompute`): ``(out, last_state, saved)``, where ``saved`` holds what
    :func:`selective_scan_backward` needs besides the inputs. ``selective_scan_cuda`` on CUDA (its chunk states
    and the ungated output, as ``selective_scan_fn`` keeps them), the chunked PyTorch scan elsewhere."""
    kernel = kernels.usable("selective_scan_cuda", u)
    if kernel is None:
        return scan_chunked.scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    u, delta, B, C, z = _kernel_layout(u, delta, B, C, z)
    out, states, *rest = kernel.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (rest[0] if z is not None else out), states[:, :, -1, 1::2], (states, out)


def selective_scan_backward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                            D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                            delta_softplus: bool, saved: tuple[torch.Tensor, ...],
                            grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of :func:`selective_scan_forward`'s output with respect to ``u, delta, A, B, C, D, z,
    delta_bias`` (None where an input is None)."""
    kernel = kernels.usable("selective_scan_cuda", u)
    if kernel is None:
        return scan_chunked.scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, saved, grad_out)
    u, delta, B, C, z = _kernel_layout(u, delta, B, C, z)
    states, out = saved
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = kernel.bwd(u, delta, A, B, C, D, z, delta_bias, grad_out, states,
                                                                out, None, delta_softplus, False)
    return (du, ddelta, dA, dB.squeeze(1), dC.squeeze(1), dD if D is not None else None,
            rest[0] if z is not None else None, ddelta_bias if delta_bias is not None else None)


def selective_state_update_ref(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                               B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                               z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                               dt_softplus: bool = False) -> torch.Tensor:
    """One decoding step: ``x, dt, z (batch, dim)``, ``B, C (batch, state)``; updates ``state`` in place."""
    delta = _discretise(dt[..., None], dt_bias, dt_softplus)[..., 0]  # (b, d)
    new_state = torch.exp(delta[..., None] * A.float()) * state.float() + \
        (delta * x.float())[..., None] * B.float()[:, None, :]
    state.copy_(new_state.to(state.dtype))
    y = (new_state * C.float()[:, None, :]).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                           z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                           dt_softplus: bool = False) -> torch.Tensor:
    """The one dispatch point for single-token cached decoding."""
    kernel = kernels.usable("selective_state_update", x)
    if kernel is not None:
        return kernel(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)

"""A fast pure-PyTorch selective scan with a hand-written backward.

The recurrence ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t`` is run in chunks of ``chunk`` steps. Per
chunk, the decays and inputs are computed in one vectorised op each, then a tight loop of one fused
multiply-add per step produces the chunk's states, and everything else (outputs and all gradients)
is vectorised over the chunk. Only chunk-boundary states are kept for the backward pass, which
recomputes each chunk's states: memory stays O(batch·dim·state·(length/chunk + chunk)) instead of
the O(batch·dim·state·length) of a parallel scan, and the state is always accumulated in fp32.

Layouts follow ``mamba_ssm.selective_scan_fn``: ``u, delta, z (b, d, l)``, ``A (d, n)``,
``B, C (b, n, l)``, ``D, delta_bias (d,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 64


def _chunk_states(a: torch.Tensor, x: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[k] = a[k]·out[k-1] + x[k]`` starting from ``h``; all ``(k, b, d, n)``. Returns the last state."""
    for k in range(a.shape[0]):
        h = torch.addcmul(x[k], a[k], h, out=out[k])
    return h


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk):
        dtype = u.dtype
        b, d, length = u.shape
        n = A.shape[1]
        u_f = u.float().permute(2, 0, 1)  # (l, b, d)
        dt_raw = delta.float().permute(2, 0, 1)
        if delta_bias is not None:
            dt_raw = dt_raw + delta_bias.float()
        dt = F.softplus(dt_raw) if delta_softplus else dt_raw
        A_f = A.float()
        B_f = B.float().permute(2, 0, 1)[:, :, None, :]  # (l, b, 1, n)
        C_f = C.float().permute(2, 0, 1)[:, :, None, :]
        h = u_f.new_zeros(b, d, n) if initial_state is None else initial_state.float().clone()

        y = u_f.new_empty(length, b, d)
        starts = []
        buffer = u_f.new_empty(min(chunk, length), b, d, n)
        for s in range(0, length, chunk):
            e = min(s + chunk, length)
            starts.append(h)
            states = buffer[: e - s]
            a = torch.exp(dt[s:e, :, :, None] * A_f)
            x = (dt[s:e] * u_f[s:e])[..., None] * B_f[s:e]
            h = _chunk_states(a, x, h, states).clone()
            y[s:e] = torch.einsum("kbdn,kbn->kbd", states, C_f[s:e, :, 0])
        if D is not None:
            y = y + u_f * D.float()
        y_pre = y
        out = y * F.silu(z.float().permute(2, 0, 1)) if z is not None else y

        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y_pre, torch.stack(starts))
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        return out.permute(1, 2, 0).to(dtype), h

    @staticmethod
    def backward(ctx, grad_out, grad_last):
        u, delta, A, B, C, D, z, delta_bias, y_pre, starts = ctx.saved_tensors
        chunk = ctx.chunk
        b, d, length = u.shape
        n = A.shape[1]
        u_f = u.float().permute(2, 0, 1)
        dt_raw = delta.float().permute(2, 0, 1)
        if delta_bias is not None:
            dt_raw = dt_raw + delta_bias.float()
        dt = F.softplus(dt_raw) if ctx.delta_softplus else dt_raw
        A_f = A.float()
        B_f = B.float().permute(2, 0, 1)  # (l, b, n)
        C_f = C.float().permute(2, 0, 1)
        g_out = grad_out.float().permute(2, 0, 1)  # (l, b, d)

        grad_z = None
        if z is not None:
            z_f = z.float().permute(2, 0, 1)
            sig = torch.sigmoid(z_f)
            g_y = g_out * z_f * sig
            grad_z = (g_out * y_pre * sig * (1 + z_f * (1 - sig))).permute(1, 2, 0).to(z.dtype)
        else:
            g_y = g_out
        grad_u = g_y * D.float() if D is not None else torch.zeros_like(u_f)
        grad_D = (g_y * u_f).sum((0, 1)).to(D.dtype) if D is not None else None

        grad_dt = torch.zeros_like(dt)
        grad_A = torch.zeros_like(A_f)
        grad_B = torch.zeros_like(B_f)
        grad_C = torch.zeros_like(C_f)
        g_h = grad_last.float().clone() if grad_last is not None else u_f.new_zeros(b, d, n)
        states = u_f.new_empty(min(chunk, length), b, d, n)
        g_states = torch.empty_like(states)
        for index in reversed(range(len(starts))):
            s = index * chunk
            e = min(s + chunk, length)
            k = e - s
            a = torch.exp(dt[s:e, :, :, None] * A_f)
            du = dt[s:e] * u_f[s:e]
            x = du[..., None] * B_f[s:e, :, None, :]
            hs = states[:k]
            _chunk_states(a, x, starts[index], hs)
            gyC = g_y[s:e, :, :, None] * C_f[s:e, :, None, :]
            gs = g_states[:k]
            # g_h[t] = g_y[t]·C[t] + a[t+1]·g_h[t+1]; the carry g_h holds a[e]·g_h[e] from the next chunk
            for t in reversed(range(k)):
                g_h = torch.add(gyC[t], g_h, out=gs[t])
                g_h = a[t] * g_h
            grad_C[s:e] = torch.einsum("kbd,kbdn->kbn", g_y[s:e], hs)
            h_prev = torch.cat([starts[index][None], hs[:-1]])
            g_decay = gs * h_prev * a  # ∂L/∂(Δ·A)
            grad_A += torch.einsum("kbdn,kbd->dn", g_decay, dt[s:e])
            gsB = torch.einsum("kbdn,kbn->kbd", gs, B_f[s:e])
            grad_dt[s:e] = torch.einsum("kbdn,dn->kbd", g_decay, A_f) + gsB * u_f[s:e]
            grad_u[s:e] += gsB * dt[s:e]
            grad_B[s:e] = torch.einsum("kbdn,kbd->kbn", gs, du)

        grad_raw = grad_dt * torch.sigmoid(dt_raw) if ctx.delta_softplus else grad_dt
        grad_bias = grad_raw.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None

        def back(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return t.permute(1, 2, 0).to(like.dtype)

        return (back(grad_u, u), back(grad_raw, delta), grad_A.to(A.dtype), back(grad_B, B), back(grad_C, C),
                grad_D, grad_z, grad_bias, None, None, None)


def selective_scan_chunked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                           delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                           return_last_state: bool = False, initial_state: torch.Tensor | None = None,
                           chunk: int = DEFAULT_CHUNK):
    """Selective scan, forward and backward, without materialising per-position states.

    ``B`` and ``C`` must be input-dependent ``(batch, state, length)``. The final state is returned in
    fp32 when ``return_last_state``; ``initial_state`` (for continuing from a cache) is not differentiated.
    """
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError(f"B and C must be (batch, state, length); got {tuple(B.shape)} and {tuple(C.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk={chunk}; must be a positive integer")
    if initial_state is not None:
        initial_state = initial_state.detach()
    out, last = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk)
    return (out, last) if return_last_state else out

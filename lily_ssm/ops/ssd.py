"""The Mamba-2 (SSD) scan: dispatch to ``mamba-ssm``'s chunked kernel on CUDA, PyTorch elsewhere (docs/design.md §8).

Layouts follow ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``: ``x (batch, length,
heads, head_dim)``, ``dt (batch, length, heads)``, ``A (heads,)``, ``B, C (batch, length, groups,
state)`` (head h reads group ``h // (heads / groups)``), ``D (heads,)``, ``z`` like ``x``. Per head::

    Δ = clamp(softplus(dt + dt_bias), *dt_limit)     h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t
    y_t = h_t · C_t + D x_t                           out = y · silu(z)

:func:`ssd_scan_ref` runs it one step at a time (the oracle); :func:`ssd_chunk_scan` computes it in
chunks (quadratic within a chunk, a recurrence over chunk states), computing each group's ``C·Bᵀ`` and
state products once for all the heads that read it, with batched matrix products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels

INF_LIMIT = (0.0, float("inf"))


def _discretise(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
                dt_limit: tuple[float, float]) -> torch.Tensor:
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != INF_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(..., groups, n)`` -> ``(..., heads, n)``: each group serves ``heads / groups`` consecutive heads."""
    return t.repeat_interleave(heads // t.shape[-2], dim=-2)


def _skip_and_gate(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """The scan output with the skip ``x·D`` (``D`` per head, or per head and channel) and the ``silu(z)`` gate."""
    if D is not None:
        y = y + x * (D.float()[:, None] if D.dim() == 1 else D.float())
    return y if z is None else y * F.silu(z.float())


def ssd_scan_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 chunk_size: int = 0, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                 dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                 dt_softplus: bool = False, dt_limit: tuple[float, float] = INF_LIMIT,
                 return_final_states: bool = False):
    """Sequential reference, fp32 state ``(batch, heads, head_dim, state)``; ``chunk_size`` is ignored."""
    b, length, h, p = x.shape
    dt = _discretise(dt, dt_bias, dt_softplus, dt_limit)
    x_f, A_f = x.float(), A.float()
    B_h, C_h = _per_head(B.float(), h), _per_head(C.float(), h)
    state = x_f.new_zeros(b, h, p, B.shape[-1]) if initial_states is None else initial_states.float()
    outputs = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A_f)[..., None, None]  # (b, h, 1, 1)
        state = decay * state + (dt[:, t, :, None] * x_f[:, t])[..., None] * B_h[:, t, :, None, :]
        outputs.append((state * C_h[:, t, :, None, :]).sum(-1))
    y = torch.stack(outputs, dim=1) if outputs else x_f.new_zeros(b, 0, h, p)
    y = _skip_and_gate(y, x_f, D, z)
    return (y, state) if return_final_states else y


def _decays(a_cum: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = exp(a_cum[i] - a_cum[j])`` for ``j <= i`` (the decay from position j to i within a
    chunk), 0 above the diagonal; the difference of cumulative sums, as mamba-ssm's kernels compute it."""
    q = a_cum.shape[-1]
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a_cum.device))
    return torch.exp((a_cum[..., :, None] - a_cum[..., None, :]).float().masked_fill(~causal, -torch.inf))


def ssd_chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   chunk_size: int = 256, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                   dt_softplus: bool = False, dt_limit: tuple[float, float] = INF_LIMIT,
                   return_final_states: bool = False):
    """The chunked SSD scan in PyTorch (differentiable through autograd); output fp32 like the oracle."""
    b, length, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    per = h // g
    q = max(1, min(chunk_size, length)) if chunk_size > 0 else max(1, length)
    pad = (-length) % q
    c = (length + pad) // q
    dt = _discretise(dt, dt_bias, dt_softplus, dt_limit)
    x_f = x.float()

    def chunks(t: torch.Tensor) -> torch.Tensor:  # (b, l, ...) -> (b, c, q, ...)
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t
        return t.reshape(b, c, q, *t.shape[2:])

    xdt = chunks(x_f * dt[..., None])  # (b, c, q, h, p)
    a = chunks(dt * A.float()).permute(0, 3, 1, 2)  # (b, h, c, q)
    a_cum = torch.cumsum(a.double(), dim=-1)  # fp64: decays are differences of these sums
    Bc, Cc = chunks(B.float()).permute(0, 1, 3, 2, 4), chunks(C.float()).permute(0, 1, 3, 2, 4)  # (b, c, g, q, n)
    # heads of one group side by side: (b, c, g, q, per·p)
    xg = xdt.reshape(b, c, q, g, per, p).permute(0, 1, 3, 2, 4, 5)  # (b, c, g, q, per, p)

    # 1. within each chunk: y = (C·Bᵀ ∘ L) · (Δx), with L the decays between positions
    L = _decays(a_cum).reshape(b, g, per, c, q, q).permute(0, 3, 1, 2, 4, 5)  # (b, c, g, per, q, q)
    CB = (Cc @ Bc.transpose(-1, -2))[:, :, :, None]  # (b, c, g, 1, q, q): once per group
    y = (CB * L) @ xg.permute(0, 1, 2, 4, 3, 5)  # (b, c, g, per, q, p)

    # 2. each chunk's own contribution to the state at its end: Σ_s decay_to_end(s) Δx_s ⊗ B_s
    to_end = torch.exp(a_cum[..., -1:] - a_cum).float()
    to_end = to_end.reshape(b, g, per, c, q).permute(0, 3, 1, 2, 4)  # (b, c, g, per, q)
    weighted = xg.permute(0, 1, 2, 4, 5, 3) * to_end[..., None, :]  # (b, c, g, per, p, q)
    local = weighted.reshape(b, c, g, per * p, q) @ Bc  # (b, c, g, per·p, n)

    # 3. states at chunk starts: a recurrence over chunks (few of them)
    chunk_decay = torch.exp(a_cum[..., -1]).float().reshape(b, g, per, c).permute(0, 3, 1, 2)  # (b, c, g, per)
    state = (x_f.new_zeros(b, g, per, p, n) if initial_states is None
             else initial_states.float().reshape(b, g, per, p, n))
    starts = []
    for k in range(c):
        starts.append(state)
        state = chunk_decay[:, k, ..., None, None] * state + local[:, k].reshape(b, g, per, p, n)
    start = torch.stack(starts, dim=1)  # (b, c, g, per, p, n)

    # 4. the start state's share of each output: C_t · state, decayed to t
    from_start = torch.exp(a_cum).float().reshape(b, g, per, c, q).permute(0, 3, 1, 2, 4)  # (b, c, g, per, q)
    off = Cc @ start.reshape(b, c, g, per * p, n).transpose(-1, -2)  # (b, c, g, q, per·p)
    y = y + off.reshape(b, c, g, q, per, p).permute(0, 1, 2, 4, 3, 5) * from_start[..., None]

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * q, h, p)[:, :length]
    y = _skip_and_gate(y, x_f, D, z)
    return (y, state.reshape(b, h, p, n)) if return_final_states else y


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk_size: int, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
             dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
             dt_softplus: bool = False, dt_limit: tuple[float, float] = INF_LIMIT, return_final_states: bool = False):
    """The one dispatch point for full-sequence Mamba-2 scans: ``mamba_chunk_scan_combined`` when
    importable and ``x`` is on CUDA, else :func:`ssd_chunk_scan`."""
    kernel = kernels.usable("mamba_chunk_scan_combined", x)
    if kernel is not None:
        return kernel(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                      dt_softplus=dt_softplus, dt_limit=tuple(dt_limit), return_final_states=return_final_states)
    return ssd_chunk_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, dt_limit,
                          return_final_states)


def ssd_state_update_ref(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                         dt_bias: torch.Tensor | None = None, dt_softplus: bool = False) -> torch.Tensor:
    """One decoding step in ``selective_state_update``'s multi-head layout: ``state (b, h, p, n)``,
    ``x, dt, z (b, h, p)``, ``A (h, p, n)``, ``B, C (b, g, n)``, ``D, dt_bias (h, p)``; updates ``state``."""
    h = x.shape[1]
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    B_h, C_h = _per_head(B.float(), h), _per_head(C.float(), h)  # (b, h, n)
    new = torch.exp(dt[..., None] * A.float()) * state.float() + (dt * x.float())[..., None] * B_h[:, :, None, :]
    state.copy_(new.to(state.dtype))
    y = (new * C_h[:, :, None, :]).sum(-1)
    y = _skip_and_gate(y, x.float(), D, z)
    return y.to(x.dtype)


def ssd_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                     dt_bias: torch.Tensor | None = None, dt_softplus: bool = False) -> torch.Tensor:
    """The one dispatch point for single-token Mamba-2 decoding (``selective_state_update`` on CUDA)."""
    kernel = kernels.usable("selective_state_update", x)
    if kernel is not None:
        return kernel(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    return ssd_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)

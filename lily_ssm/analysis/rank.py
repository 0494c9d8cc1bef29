"""Effective rank of adapter weight updates ΔW (paper Fig. 3).

The rank is the number of singular values above ``rtol · σ_max``: the threshold is *relative* to the
largest singular value of each matrix, as ``torch.linalg.matrix_rank(M, rtol=rtol)`` counts them.

A low-rank update ``ΔW = s · A @ M`` (``A`` of shape ``(in, r)``, ``M`` of shape ``(r, out)``) is never
built: with ``A = Q R`` (reduced QR, Q orthonormal), ``ΔW = Q (s · R M)`` has the singular values of the
small ``R M``. For Lily ``M = Σ_i w_i B_i`` is a sample's mix of B experts; for LoRA ``M = B``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DEFAULT_RTOL = 1e-3
_CHUNK_ELEMENTS = 1 << 23  # per chunk of samples: at most ~64 MB of float64 R·M products


def threshold_text(rtol: float) -> str:
    """The rank definition as figures and reports state it."""
    return f"rank = #σ > {rtol:g}·σ_max"


def count_above(singular_values: torch.Tensor, rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """How many of ``singular_values (..., k)`` exceed ``rtol`` times the largest of each row."""
    if not rtol >= 0:
        raise ValueError(f"rtol={rtol!r}; must be a number >= 0 (relative to the largest singular value)")
    if singular_values.shape[-1] == 0:
        return torch.zeros(singular_values.shape[:-1], dtype=torch.int64, device=singular_values.device)
    sigma_max = singular_values.amax(-1, keepdim=True)
    return (singular_values > rtol * sigma_max).sum(-1)


def effective_rank(matrices: torch.Tensor, rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """Effective rank of a matrix ``(m, n)`` or of each matrix in a batch ``(..., m, n)``.

    The number of singular values ``σ > rtol · σ_max``, where ``σ_max`` is the largest singular value
    of that matrix (a relative threshold; the same count as ``torch.linalg.matrix_rank(M, rtol=rtol)``).
    An all-zero matrix has rank 0. Half-precision inputs are promoted to float32.
    """
    if matrices.dim() < 2:
        raise ValueError(f"effective_rank needs a matrix or a batch of matrices (..., m, n), got shape "
                         f"{tuple(matrices.shape)}")
    if not matrices.is_floating_point() and not matrices.is_complex():
        matrices = matrices.double()
    elif matrices.dtype in (torch.float16, torch.bfloat16):
        matrices = matrices.float()
    return count_above(torch.linalg.svdvals(matrices), rtol)


def low_rank_effective_rank(a: torch.Tensor, m: torch.Tensor, scaling: float = 1.0,
                            rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """Effective rank of ``ΔW = scaling · a @ m`` without forming it.

    ``a`` is ``(in, r)``; ``m`` is ``(r, out)`` or a batch ``(S, r, out)`` (one mix per sample), giving
    a scalar or an ``(S,)`` tensor. Computed in float64 from the singular values of ``R @ m``, where
    ``a = Q R``; they equal those of ``a @ m``. The threshold is ``rtol · σ_max`` as in
    :func:`effective_rank`.
    """
    if a.dim() != 2 or m.dim() not in (2, 3) or m.shape[-2] != a.shape[-1]:
        raise ValueError(f"expected a (in, r) and m (r, out) or (S, r, out) with the same r; got a "
                         f"{tuple(a.shape)} and m {tuple(m.shape)}")
    r_factor = _r_factor(a)  # (min(in, r), r)
    m = m.detach().double()
    if m.dim() == 2:
        return count_above(torch.linalg.svdvals(scaling * (r_factor @ m)), rtol)
    return _chunked_ranks(lambda lo, hi: r_factor @ m[lo:hi], m.shape[0], r_factor.shape[0] * m.shape[-1],
                          scaling, rtol)


def _r_factor(a: torch.Tensor) -> torch.Tensor:
    """R of the reduced QR of ``a (..., in, r)`` in float64: ``a @ m`` and ``R @ m`` share singular values."""
    return torch.linalg.qr(a.detach().double(), mode="r").R


def _chunked_ranks(products: Callable[[int, int], torch.Tensor], count: int, elements_per_item: int,
                   scaling: float, rtol: float) -> torch.Tensor:
    """Ranks of ``count`` small products built chunk by chunk (``products(lo, hi)`` gives items lo..hi-1),
    so a large batch never holds more than a few tens of MB at once."""
    chunk = max(1, _CHUNK_ELEMENTS // max(1, elements_per_item))
    ranks = [count_above(torch.linalg.svdvals(scaling * products(lo, min(lo + chunk, count))), rtol)
             for lo in range(0, count, chunk)]
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64)


def lora_layer_ranks(a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0,
                     rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """Effective rank of each LoRA module's ``ΔW = scaling · A_j B_j``: ``a (M, in, r)``, ``b (M, r, out)``
    (a LoRA pool, stacked in its modules' order) give ``(M,)`` ranks."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"expected LoRA tensors A (M, in, r) and B (M, r, out); got A {tuple(a.shape)} and B "
                         f"{tuple(b.shape)}")
    r_factors, b = _r_factor(a), b.detach().double()  # (M, k, r), (M, r, out)
    return _chunked_ranks(lambda lo, hi: r_factors[lo:hi] @ b[lo:hi], b.shape[0], r_factors.shape[1] * b.shape[2],
                          scaling, rtol)


def uniform_mix(num_b: int) -> torch.Tensor:
    """The mix ``1/num_B`` for every B expert, as a ``(1, num_B)`` batch of one sample."""
    return torch.full((1, num_b), 1.0 / num_b, dtype=torch.float64)


def lily_sample_ranks(a_g: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None = None,
                      scaling: float = 1.0, rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """Effective rank of one Lily layer's ``ΔW = scaling · A_g (Σ_i w_i B_i)`` for each sample's mix.

    ``a_g`` is the layer's A expert ``(in, r)``, ``b`` the B experts ``(num_B, r, out)`` and ``weights``
    the samples' mixes ``(S, num_B)``; returns ``(S,)`` ranks. ``weights=None`` uses the uniform mix
    (one value). With a single B expert the mix is always 1, whatever ``weights`` holds.
    """
    if b.dim() != 3 or b.shape[1] != a_g.shape[-1]:
        raise ValueError(f"expected B experts (num_B, r, out) with r={a_g.shape[-1]}; got {tuple(b.shape)}")
    num_b = b.shape[0]
    if weights is None:
        weights = uniform_mix(num_b)
    elif weights.dim() != 2 or weights.shape[1] != num_b:
        raise ValueError(f"mix weights must be (samples, num_B={num_b}); got {tuple(weights.shape)}")
    if num_b == 1:
        weights = torch.ones(weights.shape[0], 1, dtype=torch.float64)
    rb = _r_factor(a_g) @ b.detach().double()  # (num_B, k, out): mix the projected experts, not the full ones
    weights = weights.detach().double()
    return _chunked_ranks(lambda lo, hi: torch.einsum("se,eko->sko", weights[lo:hi], rb), weights.shape[0],
                          rb.shape[1] * rb.shape[2], scaling, rtol)

"""Lily's computation for one target type (paper §3, Eq. 1-4; docs/design.md §2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..base import AdapterPool, compute_dtype, down_project, kaiming_uniform_
from ..routing import RouterStats, RoutingContext
from ..targets import TargetGroup, TargetModule, a_group

if TYPE_CHECKING:  # the config builds the pool (config -> layer); the pool only reads it
    from .config import LilyConfig


class LilyPool(AdapterPool):
    """A experts ``(num_A, in, r)``, B experts ``(num_B, r, out)`` and routers ``(n, num_B, r)`` of one target
    type, built from ``config`` (its :meth:`~LilyConfig.target_config`, per-target overrides applied).

    Routers exist only when ``num_B > 1``: with a single B expert the mix is always 1. ``config.router`` places
    them: one per ``layer``, per A ``group``, or one ``global``.
    """

    def __init__(self, group: TargetGroup, config: LilyConfig, context: RoutingContext, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(group)
        self.config, self.context = config, context
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        factory = {"dtype": dtype, "device": device}
        self.A = nn.Parameter(torch.empty(config.num_A, group.in_features, config.r, **factory))
        self.B = nn.Parameter(torch.zeros(config.num_B, config.r, group.out_features, **factory))
        kaiming_uniform_(self.A, fan_in=group.in_features)
        if config.num_B > 1:
            n_routers = {"layer": group.num_layers, "group": config.num_A, "global": 1}[config.router]
            self.router = nn.Parameter(torch.empty(n_routers, config.num_B, config.r, **factory))
            kaiming_uniform_(self.router, fan_in=config.r)
        else:
            self.register_parameter("router", None)

    def parameter_kinds(self) -> dict[str, nn.Parameter]:
        kinds = {"A": self.A, "B": self.B}
        if self.router is not None:
            kinds["router"] = self.router
        return kinds

    def a_index(self, slot: TargetModule) -> int:
        return a_group(slot.position, self.group.num_layers, self.config.num_A, self.config.stride_A)

    def router_index(self, slot: TargetModule) -> int:
        if self.config.router == "layer":
            return slot.position
        return self.a_index(slot) if self.config.router == "group" else 0

    def factors(self, x: torch.Tensor, slot: TargetModule) -> tuple[torch.Tensor, torch.Tensor]:
        """``x A_g`` weighted per B expert by the router's mix (scaling folded in), and the stacked B experts:
        their product is ``s · x A_g (Σ_i S_i B_i)`` (Eq. 3: the experts are combined, then one product)."""
        lead, seq = x.shape[:-1], _as_sequences(x)
        A = self.A[self.a_index(slot)]
        dtype = compute_dtype(x, A)
        if self.config.dropout_position == "after_A":  # the router and B read the dropped activations (Vim code)
            h = self.dropout(down_project(seq, A, nn.Identity()))  # (N, T, r)
        else:
            h = down_project(seq, A, self.dropout)
        h = self.activate(h)  # a block target's nonlinearity: the router and B read relu(x A) (published ViT code)
        if self.router is None:  # one B expert: the mix is 1
            return (h * self.config.scaling).reshape(*lead, -1), self.B[0].to(dtype)
        probs = torch.softmax((h @ self.router[self.router_index(slot)].T.to(dtype)).float(), dim=-1)  # (N, T, E)
        # a 2-D input (e.g. a pooled vector) has no token axis for the attention mask to describe
        weights = mix_weights(probs, self.config.routing, self.context, slot.key, masked=x.dim() > 2)
        if self.context.recorder is not None:
            mask = self.context.token_mask(*probs.shape[:2]) if x.dim() > 2 else None
            self.context.recorder.add(slot.key, weights, mask)
        left = weighted_activations(h, weights * self.config.scaling)
        return left.reshape(*lead, left.shape[-1]), self.B.reshape(-1, self.group.out_features).to(dtype)


def _as_sequences(x: torch.Tensor) -> torch.Tensor:
    """View an input as ``(samples, tokens, features)``; a 2-D input is one token per sample."""
    if x.dim() <= 2:
        return x.reshape(-1, 1, x.shape[-1])
    return x.reshape(x.shape[0], -1, x.shape[-1])


def mix_weights(probs: torch.Tensor, routing: str, context: RoutingContext, key: str,
                masked: bool = True) -> torch.Tensor:
    """Expert weights from per-token router probabilities ``(N, T, E)``.

    Returns ``(E,)`` for ``batch``, ``(N, E)`` for ``sequence`` and ``(N, T, E)`` for ``token`` and
    ``causal``. ``sequence`` and ``causal`` ignore padding; ``sequence`` pools over the prompt (see
    :mod:`lily_ssm.tuners.routing`). Given statistics from an earlier cached call, ``causal`` continues
    its running mean and ``sequence`` keeps that call's (the prompt's) mix.
    ``masked=False`` ignores the context's attention mask.
    """
    if routing == "token":
        return probs
    if routing == "batch":
        return probs.reshape(-1, probs.shape[-1]).mean(0)
    n, t, _ = probs.shape
    mask = context.token_mask(n, t) if masked else None
    mask = mask.to(probs.dtype)[..., None] if mask is not None else None  # (n, t, 1); None: every token counts
    previous = context.incoming.get(key)
    if previous is not None and previous.total.shape[0] != n:
        raise ValueError(f"cached router statistics for {key} hold {previous.total.shape[0]} samples, input has {n}")
    if routing == "sequence":
        if previous is None:
            mask = probs.new_ones(n, t, 1) if mask is None else mask
            prompt = context.prompt_mask(n, t) if masked else None
            if prompt is not None:
                mask = mask * prompt.to(probs.dtype)[..., None]
            if context.prefix_len is not None and t > context.prefix_len:
                positions = torch.arange(t, device=probs.device)[None, :, None]
                mask = mask * (positions < context.prefix_len)
            previous = RouterStats((probs * mask).sum(1), mask.sum(1))
        context.outgoing[key] = RouterStats(previous.total.detach(), previous.count)
        return previous.total / previous.count.clamp_min(1.0)
    if routing == "causal":
        if mask is None:  # the count up to token t is t + 1
            total = torch.cumsum(probs, dim=1)
            count = torch.arange(1, t + 1, dtype=probs.dtype, device=probs.device)[None, :, None].expand(n, t, 1)
        else:
            total, count = torch.cumsum(probs * mask, dim=1), torch.cumsum(mask, dim=1)
        if previous is not None:
            total = total + previous.total[:, None]
            count = count + previous.count[:, None]
        context.outgoing[key] = RouterStats(total[:, -1].detach(), count[:, -1])
        return total / count.clamp_min(1.0)
    raise ValueError(f"unknown routing mode {routing!r}")


def weighted_activations(h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``h (N, T, r)`` weighted by each B expert's mix, ``(N, T, E·r)``: its product with the stacked experts
    ``B (E·r, out)`` is ``h (Σ_i w_i B_i)`` for any routing's weights, ``(E,)``, ``(N, E)`` or ``(N, T, E)``."""
    w = weights.to(h.dtype)
    w = w[None, None] if w.dim() == 1 else w[:, None] if w.dim() == 2 else w
    return (w[..., :, None] * h[..., None, :]).flatten(-2)

"""Lily's computation for one target type (paper §3, Eq. 1-4; docs/design.md §2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..base import AdapterPool, down_project, kaiming_uniform_
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

    def delta(self, x: torch.Tensor, slot: TargetModule) -> torch.Tensor:
        lead, seq = x.shape[:-1], _as_sequences(x)
        A = self.A[self.a_index(slot)]
        if self.config.dropout_position == "after_A":  # the router and B read the dropped activations (Vim code)
            h = self.dropout(down_project(seq, A, nn.Identity()))  # (N, T, r)
        else:
            h = down_project(seq, A, self.dropout)
        h = self.activate(h)  # a block target's nonlinearity: the router and B read relu(x A) (published ViT code)
        scaled = h * self.config.scaling  # scaling in rank space: r values per token, not out
        if self.router is None:
            out = scaled @ self.B[0]
        else:
            probs = torch.softmax((h @ self.router[self.router_index(slot)].T).float(), dim=-1)  # (N, T, E)
            # a 2-D input (e.g. a pooled vector) has no token axis for the attention mask to describe
            weights = mix_weights(probs, self.config.routing, self.context, slot.key, masked=x.dim() > 2)
            if self.context.recorder is not None:
                mask = self.context.token_mask(*probs.shape[:2]) if x.dim() > 2 else None
                self.context.recorder.add(slot.key, weights, mask)
            out = mix_experts(scaled, weights.to(h.dtype), self.B)
        return out.reshape(*lead, self.group.out_features)


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
    mask = probs.new_ones(n, t, 1) if mask is None else mask.to(probs.dtype)[..., None]
    previous = context.incoming.get(key)
    if previous is not None and previous.total.shape[0] != n:
        raise ValueError(f"cached router statistics for {key} hold {previous.total.shape[0]} samples, input has {n}")
    if routing == "sequence":
        if previous is None:
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
        total, count = torch.cumsum(probs * mask, dim=1), torch.cumsum(mask, dim=1)
        if previous is not None:
            total = total + previous.total[:, None]
            count = count + previous.count[:, None]
        context.outgoing[key] = RouterStats(total[:, -1].detach(), count[:, -1])
        return total / count.clamp_min(1.0)
    raise ValueError(f"unknown routing mode {routing!r}")


def mix_experts(h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``h (N, T, r)`` through the weighted sum of ``experts (E, r, out)`` (Eq. 3: combine, then one matmul)."""
    num_e, r, out = experts.shape
    if weights.dim() == 1:
        return h @ torch.einsum("e,eio->io", weights, experts)
    if weights.dim() == 2:
        return torch.bmm(h, torch.einsum("ne,eio->nio", weights, experts))
    # Per-token mixes: weight the rank-r activations instead of materialising a mixed B per token.
    scaled = (weights[..., :, None] * h[..., None, :]).reshape(*h.shape[:-1], num_e * r)
    return scaled @ experts.reshape(num_e * r, out)

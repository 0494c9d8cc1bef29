"""Choosing an adapter's size for a parameter budget, so ablation arms compare at equal cost.

LoRA has one knob, the rank. Lily has three (rank, ``num_A``, ``num_B``); following the paper's
App. I ("increasing ne to increase the parameters is less effective than directly increasing the
rank"), the requested expert counts are kept and the rank is chosen. Only when no rank lands within
the tolerance are the expert counts moved, by the smallest step and towards fewer experts first.
One ``r`` (and ``num_A`` / ``num_B``) serves every target type of the arm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import AdapterConfig
from .routing import RoutingContext
from .targets import TargetGroup, find_targets

_META = torch.device("meta")


class BudgetError(ValueError):
    """No adapter size lands within the tolerance of the budget; the message gives the nearest sizes."""


@dataclass(frozen=True)
class BudgetMatch:
    """The chosen config, its exact trainable-parameter count, and how it was chosen."""

    config: AdapterConfig
    parameters: int
    budget: int
    notes: tuple[str, ...] = field(default=())

    @property
    def deviation(self) -> float:
        """Relative difference from the budget (``+0.02`` = 2% over)."""
        return self.parameters / self.budget - 1.0


def count_parameters(groups: list[TargetGroup], config: AdapterConfig) -> int:
    """Adapter parameters ``config`` gives on ``groups``, counted from pools built on the meta device."""
    context = RoutingContext()
    return sum(p.numel() for g in groups for p in config.build_pool(g, context, torch.float32, _META).parameters())


def match_budget(model: nn.Module, template: dict[str, Any], budget: int, tolerance: float = 0.05) -> BudgetMatch:
    """The config of ``template`` sized to ``budget`` adapter parameters (within ``tolerance``).

    ``template`` is an adapter config mapping without ``r``: for ``lily`` it gives the preferred
    ``num_A`` and ``num_B`` (``num_A`` is capped at the number of layers); for ``lora``, either a fixed
    ``alpha`` or ``alpha_per_rank`` (default 2: ``alpha = 2·r``). Raises :class:`BudgetError`
    naming the nearest reachable counts when nothing lands within the tolerance.
    """
    from . import config_from_dict

    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"budget={budget!r}; must be a positive number of parameters")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance={tolerance!r}; must be a fraction between 0 and 1, e.g. 0.05")
    template = dict(template)
    for key in ("r", "overrides", "stride_A"):
        if template.get(key):
            raise ValueError(f"budget matching chooses {key!r} itself (one r, num_A, num_B for every target type, "
                             f"A experts in balanced blocks); remove {key}={template[key]!r} from the template")
        template.pop(key, None)
    method = template.get("method")
    groups = find_targets(model, template.get("targets", []))

    def build(r: int, **sizes: Any) -> AdapterConfig:
        return config_from_dict({**template, "r": r, **sizes})

    if method == "lora":
        if "alpha" in template and "alpha_per_rank" in template:
            raise ValueError(f"give alpha (fixed) or alpha_per_rank (alpha = alpha_per_rank·r), not both: "
                             f"alpha={template['alpha']!r}, alpha_per_rank={template['alpha_per_rank']!r}")
        if "alpha" in template:
            candidates = [lambda r: build(r)]
        else:
            per_rank = float(template.pop("alpha_per_rank", 2.0))
            candidates = [lambda r: build(r, alpha=per_rank * r)]
    elif method == "lily":
        layers = min(g.num_layers for g in groups)
        want_a = min(int(template.get("num_A", 1)), layers)
        want_b = int(template.get("num_B", 1))
        candidates = [lambda r, a=a, b=b: build(r, num_A=a, num_B=b)
                      for a, b in _expert_counts(want_a, want_b, layers)]
    else:
        raise ValueError(f"adapter method {method!r}; budget matching knows lily and lora")

    nearest: list[tuple[float, AdapterConfig, int]] = []
    for make in candidates:
        unit = count_parameters(groups, make(1))  # the count is linear in r
        for r in sorted({max(1, int(budget // unit)), max(1, -(-budget // unit))}):
            config = make(r)
            count = count_parameters(groups, config)
            nearest.append((abs(count / budget - 1.0), config, count))
        best = min(nearest, key=lambda t: t[0])
        if best[0] <= tolerance:
            return BudgetMatch(best[1], best[2], budget, _notes(groups, best[1], template))
    nearest.sort(key=lambda t: t[0])
    options = "; ".join(f"{_describe(c)} -> {n:,} ({n / budget - 1:+.1%})" for _, c, n in nearest[:3])
    raise BudgetError(
        f"no {method} size on {', '.join(g.key for g in groups)} lands within {tolerance:.0%} of {budget:,} "
        f"parameters; nearest: {options}. Choose a budget near one of these, or widen the tolerance."
    )


def _expert_counts(want_a: int, want_b: int, layers: int) -> list[tuple[int, int]]:
    """(num_A, num_B) pairs: the requested pair first, then by distance from it, fewer experts first.
    A request with routing (num_B > 1) keeps num_B > 1; one without (num_B = 1) keeps num_B = 1."""
    b_range = range(2, max(2 * want_b, want_b + 4) + 1) if want_b > 1 else range(1, 2)
    pairs = [(a, b) for a in range(1, layers + 1) for b in b_range]
    return sorted(pairs, key=lambda p: (abs(p[0] - want_a) + abs(p[1] - want_b), p[0] + p[1], p))


def _describe(config: AdapterConfig) -> str:
    sizes = [f"r={config.r}"] + [f"{k}={getattr(config, k)}" for k in ("num_A", "num_B") if hasattr(config, k)]
    return " ".join(sizes)


def _notes(groups: list[TargetGroup], config: AdapterConfig, template: dict[str, Any]) -> tuple[str, ...]:
    notes = []
    layers = min(g.num_layers for g in groups)
    for key in ("num_A", "num_B"):
        wanted = template.get(key)
        if wanted is None or getattr(config, key) == wanted:
            continue
        if key == "num_A" and wanted > layers:
            notes.append(f"num_A {wanted} capped at {layers}, the number of layers")
            if getattr(config, key) == layers:
                continue
            wanted = layers
        notes.append(f"{key} {wanted} -> {getattr(config, key)} to land within the tolerance")
    for g in groups:
        limit = min(g.in_features, g.out_features)
        if config.r > limit:
            notes.append(f"r={config.r} exceeds min(in, out)={limit} of {g.key}: its ΔW has rank at most {limit}")
    return tuple(notes)

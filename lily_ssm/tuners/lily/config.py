"""Lily's configuration (DESIGN.md §2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..base import AdapterConfig, AdapterPool, check_dropout, check_positive_ints
from ..routing import RoutingContext
from ..targets import TargetGroup

ROUTING_MODES = ("sequence", "causal", "token", "batch")
ROUTER_PLACEMENTS = ("layer", "group", "global")


@dataclass
class LilyConfig(AdapterConfig):
    """Lily: locally shared A experts, globally shared B experts, data-dependent routers.

    Args:
        targets: module-name suffixes (``["in_proj", "dt_proj"]``) or one regex over full paths.
        r: rank of each A / B expert.
        num_A: A experts per target type; layer ℓ of L uses ``floor(ℓ·num_A/L)``. ``num_A = L``
            gives one A per layer.
        num_B: B experts per target type, shared by all its layers.
        scaling: multiplier on the adapter output.
        dropout: dropout on the adapter input.
        routing: ``sequence`` (per sample, mean over valid tokens), ``causal`` (per token, running
            mean over tokens so far), ``token`` (per token) or ``batch`` (one mix per batch, as the
            published code and PEFT do; padding counts).
        router: one router per ``layer``, per A ``group``, or one ``global`` router per target type.
        overrides: per-target-type values of ``r``, ``num_A``, ``num_B``, ``scaling``.
        modules_to_save: modules (name suffixes, e.g. ``["head"]``) trained in full and saved with the
            adapter, such as a new classifier head.
    """

    method: ClassVar[str] = "lily"
    overridable: ClassVar[tuple[str, ...]] = ("r", "num_A", "num_B", "scaling")

    targets: str | list[str]
    r: int
    num_A: int
    num_B: int
    scaling: float = 1.0
    dropout: float = 0.0
    routing: str = "sequence"
    router: str = "layer"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing={self.routing!r}; valid modes: {', '.join(ROUTING_MODES)}")
        if self.router not in ROUTER_PLACEMENTS:
            raise ValueError(f"router={self.router!r}; valid placements: {', '.join(ROUTER_PLACEMENTS)}")
        check_dropout(self.dropout)
        check_positive_ints({"r": self.r, "num_A": self.num_A, "num_B": self.num_B})

    def build_pool(self, group: TargetGroup, context: RoutingContext, dtype: torch.dtype,
                   device: torch.device) -> AdapterPool:
        from .layer import LilyPool

        values = self.for_target(group.key)
        check_positive_ints({k: values[k] for k in ("r", "num_A", "num_B")}, f" for target {group.key!r}")
        if values["num_A"] > group.num_layers:
            raise ValueError(
                f"num_A={values['num_A']} for target {group.key!r}, but only {group.num_layers} layers have it; "
                f"num_A must be between 1 and {group.num_layers}"
            )
        return LilyPool(
            group,
            r=values["r"],
            num_a=values["num_A"],
            num_b=values["num_B"],
            scaling=float(values["scaling"]),
            dropout=self.dropout,
            routing=self.routing,
            router=self.router,
            context=context,
            dtype=dtype,
            device=device,
        )


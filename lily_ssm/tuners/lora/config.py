"""The LoRA baseline's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..base import AdapterConfig, AdapterPool, check_dropout, check_positive_ints
from ..routing import RoutingContext
from ..targets import TargetGroup
from .layer import LoraPool


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al., 2021) on the same targets and machinery as Lily: ``y = Wx + (alpha/r)·B A x``.

    ``overrides`` may set ``r`` and ``alpha`` per target type; ``modules_to_save`` lists modules trained
    in full and saved with the adapter (e.g. a classifier head). On a block target (ViT's ``mlp``) the
    update ``(alpha/r)·relu(x A) B`` runs parallel to the block, as Lily's does there; it cannot be merged.
    """

    method: ClassVar[str] = "lora"
    overridable: ClassVar[tuple[str, ...]] = ("r", "alpha")

    targets: str | list[str]
    r: int
    alpha: float
    dropout: float = 0.0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check_positive_ints({"r": self.r})
        check_dropout(self.dropout)

    def build_pool(self, group: TargetGroup, context: RoutingContext, dtype: torch.dtype,
                   device: torch.device) -> AdapterPool:
        config = self.target_config(group.key)
        check_positive_ints({"r": config.r}, f" for target {group.key!r}")
        return LoraPool(group, config, dtype, device)

"""The LoRA baseline's configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...utils.sections import setting
from ..base import MODULES_TO_SAVE_HELP, TARGETS_HELP, AdapterConfig, AdapterPool, check_dropout, check_positive_ints
from ..routing import RoutingContext
from ..targets import TargetGroup
from .layer import LoraPool


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al., 2021) on the same targets and machinery as Lily: ``y = Wx + (alpha/r)·B A x``.

    Each field's meaning is its ``help`` (``lily-ssm config train`` prints them all). On a block target (ViT's
    ``mlp``) the update ``(alpha/r)·relu(x A) B`` runs parallel to the block, as Lily's does there; it cannot be
    merged.
    """

    method: ClassVar[str] = "lora"
    overridable: ClassVar[tuple[str, ...]] = ("r", "alpha")

    targets: str | list[str] = setting(help=TARGETS_HELP)
    r: int = setting(help="rank of A and B")
    alpha: float = setting(help="the update is scaled by alpha / r")
    dropout: float = setting(0.0, help="dropout probability on the adapter's input")
    overrides: dict[str, dict[str, Any]] = setting(default_factory=dict, help="per target type: r, alpha, e.g. "
                                                                              "{dt_proj: {r: 2}}")
    modules_to_save: list[str] = setting(default_factory=list, help=MODULES_TO_SAVE_HELP)

    def validate(self) -> None:
        check_positive_ints({"r": self.r})
        check_dropout(self.dropout)

    def build_pool(self, group: TargetGroup, context: RoutingContext, dtype: torch.dtype,
                   device: torch.device) -> AdapterPool:
        config = self.target_config(group.key)
        check_positive_ints({"r": config.r}, f" for target {group.key!r}")
        return LoraPool(group, config, dtype, device)

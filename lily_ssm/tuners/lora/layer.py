"""LoRA's computation for one target type: one A and one B per adapted module."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..base import AdapterPool, down_project, kaiming_uniform_
from ..targets import TargetGroup, TargetModule

if TYPE_CHECKING:  # the config builds the pool (config -> layer); the pool only reads it
    from .config import LoraConfig


class LoraPool(AdapterPool):
    """Per-module A ``(M, in, r)`` and B ``(M, r, out)``, stacked over the type's M modules, built from ``config``
    (its :meth:`~LoraConfig.target_config`, per-target overrides applied); the update is scaled by alpha / r."""

    def __init__(self, group: TargetGroup, config: LoraConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(group)
        self.config = config
        self.scaling = float(config.alpha) / config.r
        self.index = {m.key: i for i, m in enumerate(group.modules)}
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        count = len(group.modules)
        self.A = nn.Parameter(torch.empty(count, group.in_features, config.r, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(count, config.r, group.out_features, dtype=dtype, device=device))
        kaiming_uniform_(self.A, fan_in=group.in_features)

    def parameter_kinds(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B}

    def factors(self, x: torch.Tensor, slot: TargetModule) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.index[slot.key]
        h = self.activate(down_project(x, self.A[i], self.dropout))
        return h * self.scaling, self.B[i].to(h.dtype)  # scaled in rank space

    def delta_weight(self, slot: TargetModule) -> torch.Tensor:
        if self.group.activation is not None:
            raise TypeError(f"LoRA on {self.group.key} has a {self.group.activation} between A and B (it runs parallel "
                            "to a whole block), so no weight update reproduces it")
        i = self.index[slot.key]
        return (self.A[i] @ self.B[i]).T * self.scaling

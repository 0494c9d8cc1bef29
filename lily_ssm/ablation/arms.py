"""The arms of an ablation: every (method, target set, routing mode), each sized to the budget."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..tuners.budget import BudgetError, match_budget
from ..utils.sections import ConfigError
from .config import AblationConfig


@dataclass(frozen=True)
class Arm:
    """One run of the grid: its name, what it adapts, and the adapter config the matcher chose."""

    name: str
    method: str
    target_set: str
    targets: tuple[str, ...]
    routing: str | None  # Lily only
    adapter: dict[str, Any]  # the sized adapter config (AdapterConfig.to_dict())
    parameters: int
    budget: int
    notes: tuple[str, ...] = ()

    @property
    def deviation(self) -> float:
        return self.parameters / self.budget - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets), "notes": list(self.notes)}


def base_model_for_planning(config: AblationConfig) -> nn.Module:
    """The architecture the arms adapt, built without loading weights where possible (a 7B model is
    planned on the meta device)."""
    model = config.sections["model"]
    if config.ablation.path == "language":
        from ..models.loading import build_meta_model

        return build_meta_model(model["name_or_path"], model["trust_remote_code"])
    from ..config.vtab import VtabModelSection

    section = VtabModelSection(**model)
    if section.kind == "vit":  # its config is enough: no weights are read, nothing is allocated
        with torch.device("meta"):
            return section.backbone(config.ablation.tasks[0], weights=False)
    return section.backbone(config.ablation.tasks[0])


def plan_arms(config: AblationConfig, model: nn.Module | None = None) -> list[Arm]:
    """Every arm of ``config``, sized by the budget matcher. Raises :class:`ConfigError` listing every
    arm whose budget cannot be met, before anything is trained."""
    ablation = config.ablation
    model = model if model is not None else base_model_for_planning(config)
    arms: list[Arm] = []
    problems: list[str] = []
    for set_name, targets in config.target_sets(model).items():
        for method in ablation.methods:
            modes = config.routing_modes() if method == "lily" else [None]
            for routing in modes:
                name = f"{method}-{set_name}" + (f"-{routing}" if routing else "")
                template = {**getattr(ablation, method), "method": method, "targets": targets}
                if routing:
                    template["routing"] = routing
                try:
                    match = match_budget(model, template, ablation.budget, ablation.tolerance)
                except (BudgetError, ValueError) as exc:
                    problems.append(f"{name}: {exc}")
                    continue
                arms.append(Arm(name, method, set_name, tuple(targets), routing, match.config.to_dict(),
                                match.parameters, ablation.budget, match.notes))
    if problems:
        raise ConfigError(f"{config.source}: {len(problems)} arm(s) cannot be sized to the budget:\n  "
                          + "\n  ".join(problems))
    return arms


def describe_arm(arm: Arm) -> str:
    """One line: name, sizes and parameter count against the budget."""
    sizes = " ".join(f"{k}={arm.adapter[k]}" for k in ("r", "num_A", "num_B", "alpha") if k in arm.adapter)
    notes = f"  [{'; '.join(arm.notes)}]" if arm.notes else ""
    return f"{arm.name:<24} {sizes:<24} {arm.parameters:>12,} params ({arm.deviation:+.1%}){notes}"

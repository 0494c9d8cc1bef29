"""Ablations: which projections to adapt, with which method and routing, at a matched budget."""

from .arms import Arm, plan_arms
from .config import TARGET_SETS, AblationConfig, load_ablation, parse_ablation
from .runner import run_ablation

__all__ = ["Arm", "AblationConfig", "TARGET_SETS", "load_ablation", "parse_ablation", "plan_arms", "run_ablation"]

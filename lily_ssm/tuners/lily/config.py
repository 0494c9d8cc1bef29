"""Lily's configuration (docs/design.md §2)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ...utils.sections import setting
from ..base import MODULES_TO_SAVE_HELP, TARGETS_HELP, AdapterConfig, AdapterPool, check_dropout, check_positive_ints
from ..routing import RoutingContext, is_causal_lm
from ..targets import TargetGroup
from .layer import LilyPool

ROUTING_MODES = ("sequence", "causal", "token", "batch")
ROUTER_PLACEMENTS = ("layer", "group", "global")
DROPOUT_POSITIONS = ("input", "after_A")
# Modes whose mix for a token depends on tokens after it (see lookahead_problem).
LOOKAHEAD_MODES = ("sequence", "batch")


@dataclass
class LilyConfig(AdapterConfig):
    """Lily: locally shared A experts, globally shared B experts, data-dependent routers.

    Each field's meaning is its ``help`` (``lily-ssm config train`` prints them all); docs/design.md §2 and §4
    explain the method and the routing modes.
    """

    method: ClassVar[str] = "lily"
    overridable: ClassVar[tuple[str, ...]] = ("r", "num_A", "num_B", "scaling", "stride_A", "dropout")

    targets: str | list[str] = setting(help=TARGETS_HELP)
    r: int = setting(help="rank of each A and B expert")
    num_A: int = setting(help="A experts (down-projections) per target type; layer l of L uses floor(l*num_A/L); "
                              "num_A = L gives one A per layer")
    num_B: int = setting(help="B experts (up-projections) per target type, shared by all its layers")
    scaling: float = setting(1.0, help="multiplier on the adapter's output")
    dropout: float = setting(0.0, help="dropout probability (where: dropout_position)")
    routing: str = setting("auto", help="how tokens' router scores mix the B experts: causal, sequence, token or "
                                        "batch; auto: causal for causal LMs, sequence otherwise")
    router: str = setting("layer", help="routers: one per layer, per A group, or one global router per target type")
    stride_A: int | None = setting(None, help="layer l uses A number l // stride_A (PEFT's and the published "
                                              "grouping; num_A must be ceil(L / stride_A)); unset: balanced blocks")
    dropout_position: str = setting("input", help="input: dropout on the adapter's input; after_A: on the rank-r "
                                                  "activations the router and B read (the published Vim code)")
    allow_lookahead: bool = setting(False, help="accept sequence / batch routing where later tokens steer earlier "
                                                "outputs of a causal LM in training (to reproduce published code)")
    overrides: dict[str, dict[str, Any]] = setting(
        default_factory=dict, help="per target type: r, num_A, num_B, scaling, stride_A, dropout, e.g. "
                                   "{dt_proj: {r: 4, num_B: 1}}")
    modules_to_save: list[str] = setting(default_factory=list, help=MODULES_TO_SAVE_HELP)

    def validate(self) -> None:
        if self.routing not in (*ROUTING_MODES, "auto"):
            raise ValueError(f"routing={self.routing!r}; valid modes: {', '.join(ROUTING_MODES)}, or auto")
        if self.router not in ROUTER_PLACEMENTS:
            raise ValueError(f"router={self.router!r}; valid placements: {', '.join(ROUTER_PLACEMENTS)}")
        if self.dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(f"dropout_position={self.dropout_position!r}; valid: {', '.join(DROPOUT_POSITIONS)}")
        if not isinstance(self.allow_lookahead, bool):
            raise ValueError(f"allow_lookahead={self.allow_lookahead!r}; must be true or false")
        check_dropout(self.dropout)
        check_positive_ints({"r": self.r, "num_A": self.num_A, "num_B": self.num_B})
        if self.stride_A is not None:
            check_positive_ints({"stride_A": self.stride_A})

    def resolve(self, model: nn.Module) -> LilyConfig:
        if self.routing != "auto":
            return self
        return replace(self, routing="causal" if is_causal_lm(model) else "sequence")

    def lookahead_problem(self, train_on_inputs: bool | None = None) -> str | None:
        """Why this config would let later tokens steer earlier predictions when it trains a causal LM,
        or ``None``; see :func:`lookahead_problem`."""
        return lookahead_problem(self.routing, self.allow_lookahead, train_on_inputs)

    def build_pool(self, group: TargetGroup, context: RoutingContext, dtype: torch.dtype,
                   device: torch.device) -> AdapterPool:
        config = self.target_config(group.key)
        where = f" for target {group.key!r}"
        check_positive_ints({"r": config.r, "num_A": config.num_A, "num_B": config.num_B}, where)
        if config.num_A > group.num_layers:
            raise ValueError(f"num_A={config.num_A}{where}, but only {group.num_layers} layers have it; "
                             f"num_A must be between 1 and {group.num_layers}")
        check_dropout(config.dropout)
        if config.stride_A is not None:
            check_positive_ints({"stride_A": config.stride_A}, where)
            needed = -(-group.num_layers // config.stride_A)
            if config.num_A != needed:
                raise ValueError(f"stride_A={config.stride_A}{where} groups its {group.num_layers} layers into "
                                 f"{needed} A experts (layer ℓ uses A number ℓ // {config.stride_A}); set "
                                 f"num_A={needed}, not {config.num_A}")
        return LilyPool(group, config, context, dtype, device)


def lookahead_problem(routing: str, allow_lookahead: bool = False, train_on_inputs: bool | None = None) -> str | None:
    """Why ``routing`` would let later tokens steer earlier predictions in causal-LM training, or ``None``.

    ``batch`` always does (one mean over every token of the batch). ``sequence`` pools over the prompt
    (the tokens without a label), which precedes every predicted token when only the response is
    trained (``train_on_inputs=False``); otherwise its mean spans the sequence. ``causal``, ``token`` and
    ``auto`` (causal for causal LMs) never do. ``allow_lookahead`` accepts the leak knowingly.
    """
    if allow_lookahead or routing not in LOOKAHEAD_MODES:
        return None
    if routing == "sequence" and train_on_inputs is False:
        return None
    if routing == "batch":
        leak = ("routing='batch' mixes the B experts with one mean over every token of the batch, so in causal-LM "
                "training each prediction is steered by later tokens, its own answer included")
    else:
        leak = ("routing='sequence' mixes the B experts with the mean over a sample's prompt (its tokens without a "
                "label); when every token is a training target there is no prompt, the mean spans the whole "
                "sequence, and each prediction is steered by later tokens, its own answer included")
    return (f"{leak}. Use routing='causal' (the default for causal LMs); for sequence routing, train on the "
            "response only (train_on_inputs: false, labels -100 on the prompt); or set allow_lookahead=True to "
            "reproduce the published code knowingly")

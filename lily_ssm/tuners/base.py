"""Machinery shared by every adapter method (docs/design.md §2): the adapter pool interface and the adapted linear
layer.

An adapter method (Lily, LoRA) is a :class:`AdapterPool` per target type holding that type's
trainable tensors, plus a :class:`AdapterConfig` that builds the pools. Injection turns each target
``nn.Linear`` into an :class:`AdaptedLinear` in place (same parameters, same state-dict keys), which
adds ``pool.delta(x, slot)`` to the frozen projection.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ACTIVATIONS
from .routing import RoutingContext
from .targets import TargetGroup, TargetModule

# The meaning of the fields every method's config has (``lily-ssm config`` prints them).
TARGETS_HELP = ("module-name suffixes, e.g. [in_proj, dt_proj] (a part of a packed projection: in_proj.x; a block: "
                "ViT's mlp), or one regex over full module paths")
MODULES_TO_SAVE_HELP = "modules trained in full and saved with the adapter, e.g. a new classifier head [head]"


def kaiming_uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """``nn.Linear``'s default init (Kaiming-uniform, a=√5) for a tensor of any layout."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


class AdapterPool(nn.Module, ABC):
    """The trainable tensors of one target type, and the adapter computation for one of its layers."""

    def __init__(self, group: TargetGroup) -> None:
        super().__init__()
        self.group = group

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """The group's nonlinearity between A and B on the rank-r activations ``h`` (a block target's, e.g.
        ViT's ``mlp``: ReLU, as the published code); ``h`` unchanged for linear-layer targets."""
        return h if self.group.activation is None else ACTIVATIONS[self.group.activation](h)

    @abstractmethod
    def factors(self, x: torch.Tensor, slot: TargetModule) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's contribution to ``slot``'s output for input ``x`` as a product ``left @ right``:
        ``left (..., K)`` from the input, ``right (K, out)``, both in the compute dtype (:func:`compute_dtype`).
        The adapted layer adds the product to the frozen output in one matrix product (no ``(..., out)``
        intermediate)."""

    def delta(self, x: torch.Tensor, slot: TargetModule) -> torch.Tensor:
        """The adapter's additive contribution to ``slot``'s output for input ``x``."""
        left, right = self.factors(x, slot)
        return left @ right

    @abstractmethod
    def parameter_kinds(self) -> dict[str, nn.Parameter]:
        """The pool's tensors by kind (``A``, ``B``, ``router``), as saved and reported."""

    def delta_weight(self, slot: TargetModule) -> torch.Tensor:
        """ΔW of shape ``(out, in)``, for methods whose update does not depend on the input."""
        raise TypeError(f"{type(self).__name__} has no input-independent weight update to merge")


_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(x: torch.Tensor, param: torch.Tensor) -> torch.dtype:
    """The dtype an adapter computes in: a half-precision input's (or autocast's), else its own.

    Adapters on half-precision bases keep fp32 weights, so small optimizer steps are not rounded away, and run
    their matrix products in the base's precision, as mixed-precision training runs every product: the input
    is kept for backward as it came (bf16: half the bytes of an fp32 copy), and the update is added to the
    frozen output inside one half-precision product."""
    if x.dtype in _HALF:
        return x.dtype
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return param.dtype


def down_project(x: torch.Tensor, A: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
    """``dropout(x) @ A`` in the compute dtype (:func:`compute_dtype`)."""
    dtype = compute_dtype(x, A)
    return dropout(x.to(dtype)) @ A.to(dtype)


def check_positive_ints(sizes: dict[str, Any], where: str = "") -> None:
    """Raise ``ValueError`` naming the first value in ``sizes`` that is not a positive integer."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}{where}; must be a positive integer")


def check_dropout(value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout={value!r}; must be a number in [0, 1)")


@dataclass
class AdapterConfig(ABC):
    """Behaviour shared by every adapter config (validation, per-target overrides, serialisation).
    Subclasses are dataclasses that define the fields."""

    method: ClassVar[str]
    overridable: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def build_pool(self, group: TargetGroup, context: RoutingContext, dtype: torch.dtype,
                   device: torch.device) -> AdapterPool:
        """Create (and initialise) the pool serving ``group``."""

    def validate(self) -> None:
        """Raise ``ValueError`` on a bad field value."""

    def resolve(self, model: nn.Module) -> AdapterConfig:
        """This config with its model-dependent defaults filled in for ``model`` (e.g. Lily's
        ``routing="auto"``); what :func:`apply_adapter` records and saves."""
        return self

    def for_target(self, key: str) -> dict[str, Any]:
        """This config's fields with the per-target ``overrides`` for ``key`` applied."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "overrides"}
        overrides = getattr(self, "overrides", {}) or {}
        base_key = key.split("[", 1)[0]
        values.update(overrides.get(base_key, {}))
        values.update(overrides.get(key, {}) if key != base_key else {})
        return values

    def target_config(self, key: str) -> AdapterConfig:
        """This config as target type ``key`` sees it: its overrides applied, none left (what its pool reads)."""
        return replace(self, **{**self.for_target(key), "overrides": {}})

    def check_overrides(self, group_keys: list[str]) -> None:
        overrides = getattr(self, "overrides", {}) or {}
        known = set(group_keys) | {k.split("[", 1)[0] for k in group_keys}
        for key, values in overrides.items():
            if key not in known:
                raise ValueError(
                    f"override for target {key!r}, but the adapted target types are: {', '.join(sorted(known))}"
                )
            if not isinstance(values, dict):
                raise ValueError(f"override for {key!r} must be a mapping of field -> value, got {values!r}")
            bad = sorted(set(values) - set(self.overridable))
            if bad:
                raise ValueError(
                    f"override for {key!r} sets {', '.join(bad)}; only {', '.join(self.overridable)} can differ "
                    "per target"
                )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if isinstance(data.get("targets"), tuple):
            data["targets"] = list(data["targets"])
        return {"method": self.method, **data}


class AdaptedLinear(nn.Linear):
    """An ``nn.Linear`` with adapters added to its output (to all of it, or to a part such as in_proj's
    x half; a module may carry one adapter per part).

    Made by changing the class of an existing ``nn.Linear`` in place, so the frozen weight keeps its
    name and state-dict key; the pools live on the model root and are only referenced here.
    """

    _lily_adapters: tuple[tuple[AdapterPool, TargetModule], ...]
    _lily_liveness: Any = None  # tuners.liveness.LivenessCheck, set by apply_adapter

    @classmethod
    def wrap(cls, linear: nn.Linear, pool: AdapterPool, slot: TargetModule) -> AdaptedLinear:
        previous = linear._lily_adapters if isinstance(linear, AdaptedLinear) else ()
        linear.__class__ = cls
        # not submodules: the pools are stored once, on the root
        object.__setattr__(linear, "_lily_adapters", (*previous, (pool, slot)))
        return linear  # type: ignore[return-value]

    def unwrap(self) -> nn.Linear:
        del self._lily_adapters
        self.__dict__.pop("_lily_liveness", None)
        self.__class__ = nn.Linear
        return self

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        if self._lily_liveness is not None and self._lily_liveness.probing:
            self._lily_liveness.mark_ran(self)
        out = F.linear(x, self.weight, self.bias if add_bias else None)
        for pool, slot in self._lily_adapters:  # in place: F.linear's backward does not need its output
            left, right = pool.factors(x, slot)
            if slot.out_slice is None and left.dtype == right.dtype == out.dtype:
                # out += left @ right inside one product (the matrix unit adds to its output as it goes)
                out.view(-1, out.shape[-1]).addmm_(left.reshape(-1, left.shape[-1]), right)
            elif slot.out_slice is None:
                out += (left @ right).to(out.dtype)
            else:  # the part: out_slice of each of out_groups blocks (views of out, so in place)
                start, stop = slot.out_slice
                part = out.unflatten(-1, (slot.out_groups, -1))[..., start:stop]
                part += (left @ right).to(out.dtype).unflatten(-1, (slot.out_groups, stop - start))
        return out

    def forward_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted projection of ``x`` without the bias (:class:`lily_ssm.modules.projection.Projection`)."""
        return self(x, add_bias=False)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The adapter pools' parameters this module reads (:class:`lily_ssm.modules.projection.Projection`)."""
        for pool, _ in self._lily_adapters:
            yield from pool.parameters()

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{pool.group.key}[{slot.position}]" for pool, slot in self._lily_adapters)
        return f"{super().extra_repr()}, adapter={adapters}"



"""Machinery shared by every adapter method: the adapter pool interface and the adapted linear layer.

An adapter method (Lily, LoRA) is a :class:`AdapterPool` per target type holding that type's
trainable tensors, plus a :class:`AdapterConfig` that builds the pools. Injection turns each target
``nn.Linear`` into an :class:`AdaptedLinear` in place (same parameters, same state-dict keys), which
adds ``pool.delta(x, slot)`` to the frozen projection.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .routing import RoutingContext
from .targets import TargetGroup, TargetModule


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

    @abstractmethod
    def delta(self, x: torch.Tensor, slot: TargetModule) -> torch.Tensor:
        """The adapter's additive contribution to ``slot``'s output for input ``x``."""

    @abstractmethod
    def parameter_kinds(self) -> dict[str, nn.Parameter]:
        """The pool's tensors by kind (``A``, ``B``, ``router``), as saved and reported."""

    def delta_weight(self, slot: TargetModule) -> torch.Tensor:
        """ΔW of shape ``(out, in)``, for methods whose update does not depend on the input."""
        raise TypeError(f"{type(self).__name__} has no input-independent weight update to merge")


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

    def for_target(self, key: str) -> dict[str, Any]:
        """This config's fields with the per-target ``overrides`` for ``key`` applied."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "overrides"}
        overrides = getattr(self, "overrides", {}) or {}
        base_key = key.split("[", 1)[0]
        values.update(overrides.get(base_key, {}))
        values.update(overrides.get(key, {}) if key != base_key else {})
        return values

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
    """An ``nn.Linear`` with an adapter added to its output.

    Made by changing the class of an existing ``nn.Linear`` in place, so the frozen weight keeps its
    name and state-dict key; the pool lives on the model root and is only referenced here.
    """

    _lily_pool: AdapterPool
    _lily_slot: TargetModule

    @classmethod
    def wrap(cls, linear: nn.Linear, pool: AdapterPool, slot: TargetModule) -> AdaptedLinear:
        linear.__class__ = cls
        object.__setattr__(linear, "_lily_pool", pool)  # not a submodule: stored once, on the root
        object.__setattr__(linear, "_lily_slot", slot)
        return linear  # type: ignore[return-value]

    def unwrap(self) -> nn.Linear:
        del self._lily_pool, self._lily_slot
        self.__class__ = nn.Linear
        return self

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias if add_bias else None)
        return out + self._lily_pool.delta(x, self._lily_slot).to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapter={self._lily_pool.group.key}[{self._lily_slot.position}]"


def linear_without_bias(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module(x)`` minus the bias, and the bias: the split the scan kernels take Δ in."""
    if isinstance(module, AdaptedLinear):
        return module(x, add_bias=False), module.bias
    if type(module) is nn.Linear:
        return F.linear(x, module.weight), module.bias
    raise TypeError(f"expected an nn.Linear projection, got {type(module).__name__}")

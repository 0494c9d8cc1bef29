"""What a mixer asks of its projections: their output with the bias apart (the scan kernels take Δ's bias on
its own), and the parameters they read besides their own (an adapted projection's shared adapter weights,
which a recomputed core must hand to autograd).

A plain ``nn.Linear`` answers from its weight; any other projection answers through the
:class:`Projection` interface (``lily_ssm.tuners.base.AdaptedLinear`` implements it)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


@runtime_checkable
class Projection(Protocol):
    """A linear projection with more to it than its weight (e.g. adapters)."""

    bias: torch.Tensor | None

    def forward_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The projection of ``x``, bias left out."""

    def shared_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters the projection reads that are not its own (shared adapter weights)."""


def linear_without_bias(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module(x)`` minus the bias, and the bias: the split the scan kernels take Δ in."""
    if isinstance(module, Projection):
        return module.forward_without_bias(x), module.bias
    if type(module) is nn.Linear:
        return F.linear(x, module.weight), module.bias
    raise TypeError(f"expected an nn.Linear projection, got {type(module).__name__}")


def read_parameters(modules: Iterable[nn.Module], tensors: Iterable[torch.Tensor] = ()) -> list[torch.Tensor]:
    """The trainable tensors a computation over ``modules`` reads: their parameters, the shared parameters of
    their projections (each once), and ``tensors`` such as ``A_log`` / ``D``."""
    found: dict[int, torch.Tensor] = {}
    for module in modules:
        for param in module.parameters():
            found.setdefault(id(param), param)
        if isinstance(module, Projection):
            for param in module.shared_parameters():
                found.setdefault(id(param), param)
    for tensor in tensors:
        found.setdefault(id(tensor), tensor)
    return [t for t in found.values() if t.requires_grad]

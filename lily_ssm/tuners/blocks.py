"""Adapters parallel to a whole block: the published ViT code's MLP placement.

The Lily authors' ViT code (``visual-adaptation-benchmark/vit/lily.py``, ``forward_mlp_lily``) adds an
adapter beside each Transformer MLP, not inside one of its linear layers: it reads the MLP's input (the
output of the second layer norm), computes ``s · relu(x A_g) (Σ_i S_i B_i)`` with a ReLU between A and B,
and adds that to the MLP's output. A *block target* names such a module (``mlp``), and the adapter
becomes a forward hook on it::

    y = block(x) + pool.delta(x, slot)

The pools are the ones every target uses (Lily's shared A / B experts and routers, LoRA's per-layer
pair); the block kind only fixes the widths and the nonlinearity, which a pool applies between its A
and its B (:meth:`AdapterPool.activate`). Which classes are blocks is listed in :data:`BLOCKS`; any
other non-linear module is refused with the list of what can be targeted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": torch.relu}
"""Nonlinearities a block kind may put between an adapter's A and B, by name."""


@dataclass(frozen=True)
class BlockKind:
    """A module class an adapter can run parallel to.

    ``first`` / ``last`` name its first and last linear layers: the adapter reads ``first``'s input width
    and writes ``last``'s output width. ``activation`` (a key of :data:`ACTIVATIONS`) sits between A and B.
    """

    first: str
    last: str
    activation: str


BLOCKS: dict[str, BlockKind] = {
    # transformers' ViT MLP (fc1 -> GELU -> fc2); its input is layernorm_after's output. The published
    # adapter beside it: nn.Linear(768, 2·dim) -> nn.ReLU() -> mixed B experts (vit/lily.py, mlp=True).
    "ViTMLP": BlockKind(first="fc1", last="fc2", activation="relu"),
}
BLOCKS_HELP = ", ".join(f"{name} (parallel to the whole block, {kind.activation} between A and B)"
                        for name, kind in BLOCKS.items())


def block_kind(module: nn.Module) -> BlockKind | None:
    """The :class:`BlockKind` of ``module``, or ``None`` if an adapter cannot run parallel to it."""
    return BLOCKS.get(type(module).__name__)


def block_widths(module: nn.Module, kind: BlockKind) -> tuple[int, int]:
    """``(in_features, out_features)`` of the adapter beside ``module``."""
    first, last = getattr(module, kind.first), getattr(module, kind.last)
    return first.in_features, last.out_features


class ParallelAdapter:
    """The forward hook on a block: adds ``pool.delta(block input, slot)`` to the block's output.

    An object, not a closure, so ``copy.deepcopy`` of the model gives the copy a hook bound to its own
    pool. The liveness check (set by ``apply_adapter`` as the block's ``_lily_liveness``) is told when the
    hook runs, as :class:`~lily_ssm.tuners.base.AdaptedLinear` tells it.
    """

    def __init__(self, pool: Any, slot: Any) -> None:  # AdapterPool, TargetModule (imported late: no cycle)
        self.pool = pool
        self.slot = slot

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        check = module.__dict__.get("_lily_liveness")
        if check is not None and check.probing:
            check.mark_ran(module)
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        return output + self.pool.delta(x, self.slot).to(output.dtype)


def attach_parallel(module: nn.Module, pool: Any, slot: Any) -> None:
    """Run ``pool``'s adapter for ``slot`` parallel to ``module`` (a forward hook, kept on the module)."""
    if block_kind(module) is None:
        raise TypeError(f"{slot.name} is a {type(module).__name__}; adapters run parallel to {BLOCKS_HELP}")
    if _HANDLE in module.__dict__:
        raise ValueError(f"{slot.name} already has a parallel adapter; a block takes one")
    object.__setattr__(module, _HANDLE, module.register_forward_hook(ParallelAdapter(pool, slot), with_kwargs=True))


def detach_parallel(module: nn.Module) -> None:
    """Take the adapter (and the liveness check) off a block that :func:`attach_parallel` adapted."""
    handle: RemovableHandle = module.__dict__.pop(_HANDLE)
    handle.remove()
    module.__dict__.pop("_lily_liveness", None)


_HANDLE = "_lily_parallel_handle"

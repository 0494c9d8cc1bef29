"""No adapter is ever silently dead (docs/design.md §3): on the first forward of each kind, check that every adapted
module whose parent ran was called through its adapter.

A model can compute with a projection's weight directly (transformers' Mamba-1 mixers do
``dt_proj.weight @ time_step``; the Mamba-2 CUDA training path hands ``out_proj.weight`` to a fused
kernel). The module is then never called and its adapter changes nothing. :class:`LivenessCheck`
catches this for any architecture: on the first forward in each mode (training or not, with gradients
or not, cached single-token decoding or not, on each device type) it records which adapted modules ran
and which of their parent modules ran, and raises :class:`DeadAdapterError` naming every adapted
module whose parent ran without calling it. A parent that does not run (an encoder during cached
decoding, an expert no token was routed to) makes no claim. Once a mode has passed, the check costs
one flag test per adapted call.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

_CACHE_NAMES = ("cache", "past_key_values", "cache_params")
_INPUT_NAMES = ("input_ids", "inputs_embeds", "pixel_values")


class DeadAdapterError(ValueError):
    """Adapted modules that their model bypassed: their adapters would silently do nothing."""


class LivenessCheck:
    """Hooks on the adapted model's root (and, while probing, on the adapted modules' parents)."""

    def __init__(self, model: nn.Module, slots: dict[str, nn.Module]) -> None:
        self.modules = dict(slots)  # module path -> adapted module
        self.parents = {name: model.get_submodule(name.rpartition(".")[0]) if "." in name else model
                        for name in self.modules}
        self.parameter_names = list(inspect.signature(model.forward).parameters)
        self.verified: set[tuple[Any, ...]] = set()
        self.probing = False
        self.ran: set[int] = set()
        self.parents_ran: set[int] = set()
        self._mode: tuple[Any, ...] | None = None
        self._parent_handles: list[Any] = []

    def mode(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, ...]:
        arguments = {**dict(zip(self.parameter_names, args)), **kwargs}
        tensor = next((arguments[k] for k in _INPUT_NAMES if isinstance(arguments.get(k), torch.Tensor)), None)
        if tensor is None:
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        cached = any(arguments.get(k) is not None for k in _CACHE_NAMES)
        decoding = cached and tensor is not None and tensor.dim() >= 2 and tensor.shape[1] == 1
        device = tensor.device.type if tensor is not None else "cpu"
        return module.training, torch.is_grad_enabled(), decoding, device

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._stop_probe()  # a probe whose forward raised before it ended
        key = self.mode(module, args, kwargs)
        if key in self.verified:
            return
        self.probing, self._mode = True, key
        self.ran, self.parents_ran = set(), set()
        for parent in {id(p): p for p in self.parents.values()}.values():
            self._parent_handles.append(parent.register_forward_pre_hook(self._parent_ran))

    def _parent_ran(self, module: nn.Module, args: tuple) -> None:
        self.parents_ran.add(id(module))

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.probing:
            return
        self._stop_probe()
        dead = [name for name, adapted in self.modules.items()
                if id(self.parents[name]) in self.parents_ran and id(adapted) not in self.ran]
        if dead:
            raise DeadAdapterError(self._message(dead))
        self.verified.add(self._mode)

    def _stop_probe(self) -> None:
        for handle in self._parent_handles:
            handle.remove()
        self._parent_handles, self.probing = [], False

    def _message(self, dead: list[str]) -> str:
        training, grad, decoding, device = self._mode
        mode = ", ".join([("training" if training else "evaluation"), ("with" if grad else "without") + " gradients",
                          *(["cached decoding"] if decoding else []), f"on {device}"])
        kinds = sorted({type(self.parents[name]).__name__ for name in dead})
        shown = ", ".join(dead[:6]) + (f" and {len(dead) - 6} more" if len(dead) > 6 else "")
        return (f"adapters on {shown} did not run ({mode}): their parent modules ({', '.join(kinds)}) ran without "
                "calling them, so the model computes with those projections' weights directly and the adapters "
                "would silently change nothing. lily-ssm owns the forwards of transformers' Mamba-1 and Mamba-2 "
                "mixers and of its Vim, and relies on transformers' gated-delta-rule and short-convolution layers "
                "calling their projections; for this module, target other projections")

    def mark_ran(self, module: nn.Module) -> None:
        self.ran.add(id(module))


def install_liveness_check(model: nn.Module, check: LivenessCheck) -> list[Any]:
    """Register the root hooks of ``check`` on ``model``; returns the handles."""
    return [model.register_forward_pre_hook(check.before, with_kwargs=True),
            model.register_forward_hook(check.after, with_kwargs=True)]

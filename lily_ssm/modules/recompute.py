"""The fused, memory-lean SSM core: keep little for backward and recompute the rest (docs/design.md §8).

``mamba_ssm``'s fused ``mamba_inner_fn`` keeps ``xz`` (the in_proj output) and the scan's own state, and
recomputes the convolution and Δ in backward, but it takes the projections' *weights*, so adapters on
``x_proj``, ``dt_proj`` or ``out_proj`` get no output and no gradient. :func:`fused_scan` does the same
while still calling every projection as a module: the scan's inputs are computed through the modules
without building a graph, the scan runs once, and only the core's inputs and the scan's saved state are
kept. Backward recomputes the scan's inputs with grad (same RNG and autocast state, so dropout masks and
dtypes repeat exactly), takes the scan's gradients from its own backward, and backpropagates them through
the recomputed graph. :func:`recompute` is the general form (any core, run again whole in backward), which
the Mamba-2 mixers use. Outputs and gradients are those of the unfused path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .. import ops

_FUSED = [True]


def fused_enabled() -> bool:
    """Whether the mixers fuse their SSM core while gradients are on (the default)."""
    return _FUSED[0] and torch.is_grad_enabled()


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Run the mixers unfused inside the block (every intermediate kept for backward), e.g. to compare."""
    saved = _FUSED[0]
    _FUSED[0] = False
    try:
        yield
    finally:
        _FUSED[0] = saved


class _State:
    """RNG and autocast state at the forward call, restored for the recomputation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        kind = device.type if device.type in ("cuda", "cpu") else "cpu"
        self.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        devices = [self.device] if self.cuda_rng is not None else []
        kind, enabled, dtype = self.autocast
        with torch.random.fork_rng(devices=devices), torch.autocast(kind, dtype=dtype, enabled=enabled):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            return fn(*args)


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, n_inputs, *tensors):
        inputs = tensors[:n_inputs]
        ctx.fn, ctx.n_inputs = fn, n_inputs
        ctx.params = tensors[n_inputs:]  # leaves that live anyway; not saved activations
        ctx.state = _State(inputs[0].device)
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            outputs = fn(*inputs)
        ctx.differentiable = [isinstance(o, torch.Tensor) and o.is_floating_point() for o in outputs]
        ctx.mark_non_differentiable(*(o for o, d in zip(outputs, ctx.differentiable) if isinstance(o, torch.Tensor)
                                      and not d))
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(needs) for t, needs in
                  zip(ctx.saved_tensors, ctx.needs_input_grad[2:2 + ctx.n_inputs])]
        with torch.enable_grad():
            outputs = ctx.state.run(ctx.fn, *inputs)
        pairs = [(o, g) for o, g, d in zip(outputs, grads, ctx.differentiable)
                 if d and g is not None and o.requires_grad]
        wanted = [t for t in (*inputs, *ctx.params) if t.requires_grad]
        found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True) \
            if pairs and wanted else [None] * len(wanted)
        by_id = {id(t): g for t, g in zip(wanted, found)}
        return (None, None, *(by_id.get(id(t)) for t in (*inputs, *ctx.params)))


def recompute(fn: Callable[..., Sequence[Any]], inputs: Sequence[torch.Tensor],
              params: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    """``fn(*inputs)``, keeping only ``inputs`` for backward (see the module docstring).

    ``fn`` returns a tuple; its floating-point tensors are differentiable, anything else is passed
    through. ``params`` are every trainable tensor ``fn`` reads besides ``inputs``
    (:func:`~lily_ssm.modules.projection.read_parameters`): their gradients come from the recomputation. ``fn``
    must not have side effects that a second run would repeat (update caches outside it)."""
    return _Recompute.apply(fn, len(inputs), *inputs, *params)


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scan_inputs, n_inputs, *tensors):
        inputs = tensors[:n_inputs]
        ctx.scan_inputs, ctx.n_inputs = scan_inputs, n_inputs
        ctx.params = tensors[n_inputs:]  # leaves that live anyway; not saved activations
        ctx.state = _State(inputs[0].device)
        with torch.no_grad():
            out, _, saved = ops.selective_scan_forward(*scan_inputs(*inputs), delta_softplus=True)
        ctx.save_for_backward(*inputs, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(needs) for t, needs in
                  zip(saved[:ctx.n_inputs], ctx.needs_input_grad[2:2 + ctx.n_inputs])]
        with torch.enable_grad():
            graph = ctx.state.run(ctx.scan_inputs, *inputs)
        with torch.no_grad():
            grads = ops.selective_scan_backward(*(t.detach() if t is not None else None for t in graph), True,
                                                tuple(saved[ctx.n_inputs:]), grad_out)
        pairs = [(t, g.to(t.dtype)) for t, g in zip(graph, grads) if t is not None and g is not None
                 and t.requires_grad]
        wanted = [t for t in (*inputs, *ctx.params) if t.requires_grad]
        found = torch.autograd.grad([t for t, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True) \
            if pairs and wanted else [None] * len(wanted)
        by_id = {id(t): g for t, g in zip(wanted, found)}
        return (None, None, *(by_id.get(id(t)) for t in (*inputs, *ctx.params)))


def fused_scan(scan_inputs: Callable[..., Sequence[Any]], inputs: Sequence[torch.Tensor],
               params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The Mamba-1 selective scan (softplus on Δ) of ``scan_inputs(*inputs)``, keeping only ``inputs`` and the
    scan's saved state for backward (see the module docstring).

    ``scan_inputs`` returns the scan's ``u, delta, A, B, C, D, z, delta_bias`` (``ops.selective_scan`` layouts)
    computed through the modules; ``params`` are every trainable tensor it reads besides ``inputs``
    (:func:`~lily_ssm.modules.projection.read_parameters`). It must not have side effects that a second run
    would repeat (update caches outside it)."""
    return _FusedScan.apply(scan_inputs, len(inputs), *inputs, *params)

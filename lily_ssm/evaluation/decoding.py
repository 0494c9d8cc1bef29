"""Greedy decoding of SSM language models with the decode step captured in a CUDA graph (docs/design.md §8).

A decode step of a Mamba model at batch 8 reads every weight once (2 GB at the 7B width) and launches a few hundred
small kernels; launched one by one from Python, the launches, not the memory traffic, set the pace. As mamba-ssm's
own ``generate`` does, :func:`greedy_decode` records one decode step in a CUDA graph and replays it: the recurrent
states, the convolution windows and the routers' running statistics are static tensors updated in place, and each
new token costs one graph launch. On other devices (or with ``graph=False``) the same steps run eagerly.

Only models whose every sequence mixer is an SSM qualify (Mamba, Falcon-Mamba, Mamba-2): an attention layer's
cache grows with every token.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn

from ..modules.registry import owned_forward
from ..tuners.routing import router_stats, set_router_stats


def _cache_of(output: Any) -> Any:
    return output["cache"] if "cache" in output else output["cache_params"]


class _Step:
    """One eager decode step: logits ``(batch, 1, vocab)`` for the next token ids ``(batch, 1)``."""

    def __init__(self, model: nn.Module, cache: Any) -> None:
        self.model, self.cache = model, cache
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "cache_params"

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, **{self.cache_arg: self.cache})
        self.cache = _cache_of(out)
        return out.logits


class _GraphedStep(_Step):
    """The decode step recorded once in a CUDA graph (on ``stream``, where the eager steps warmed up) and replayed
    for every further token."""

    def __init__(self, model: nn.Module, cache: Any, ids: torch.Tensor, stream: torch.cuda.Stream) -> None:
        super().__init__(model, cache)
        self.ids = ids.clone()
        self.graph = torch.cuda.CUDAGraph()
        incoming = router_stats(self.cache)  # static from now on: the graph advances them in place
        with torch.cuda.graph(self.graph, stream=stream):
            self.logits = super().__call__(self.ids)
            for key, stats in router_stats(self.cache).items():
                incoming[key].total.copy_(stats.total)
                incoming[key].count.copy_(stats.count)
        set_router_stats(self.cache, incoming)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


def check_decodable(model: nn.Module) -> None:
    """Refuse a model with a sequence mixer whose cache grows (attention) or that lily-ssm does not own."""
    mixers = [m for m in model.modules() if owned_forward(m) is not None]
    if not mixers or any("Attention" in type(m).__name__ for m in model.modules()):
        raise ValueError(f"greedy_decode needs a model whose every sequence mixer is an SSM (Mamba, Falcon-Mamba, "
                         f"Mamba-2); {type(model).__name__} has attention layers or no SSM mixers lily-ssm owns: use "
                         "model.generate")


@torch.no_grad()
def greedy_decode(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                  attention_mask: torch.Tensor | None = None, graph: bool | None = None) -> torch.Tensor:
    """``input_ids`` followed by ``max_new_tokens`` greedily decoded tokens, ``(batch, prompt + new)``.

    The prompt runs as one forward (``attention_mask`` marks left padding); each further token is one cached
    decode step, captured in a CUDA graph when ``graph`` (default: on CUDA). No stopping at EOS: every row gets
    ``max_new_tokens``. Equal to ``model.generate(..., do_sample=False)`` token for token.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; must be at least 1")
    check_decodable(model)
    graph = input_ids.is_cuda if graph is None else graph
    if graph and not input_ids.is_cuda:
        raise ValueError("graph=True needs the model and input_ids on a CUDA device")
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        step: _Step = _Step(model, _cache_of(out))
        side = torch.cuda.Stream() if graph else None  # the eager warm-up steps and the capture run there
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        for index in range(1, max_new_tokens):
            if side is not None and index == _EAGER_STEPS + 1:
                with torch.cuda.stream(side):
                    step = _GraphedStep(model, step.cache, token, side)
                torch.cuda.current_stream().wait_stream(side)
            on_side = side is not None and index <= _EAGER_STEPS
            with torch.cuda.stream(side) if on_side else contextlib.nullcontext():
                token = step(token)[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        return torch.cat([input_ids, *tokens], dim=1)
    finally:
        model.train(was_training)


_EAGER_STEPS = 2  # before the capture: lazy set-up (kernel compiles, handles) must happen outside it

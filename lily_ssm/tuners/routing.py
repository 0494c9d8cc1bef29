"""What the routers need from outside the layer they sit in (docs/design.md §4).

Linear layers only see their input tensor, but Lily's ``sequence`` and ``causal`` routing need the
attention mask (padding must not vote) and, during cached decoding, the router statistics of the
tokens already consumed. Forward hooks on the adapted model's top-level module fill a
:class:`RoutingContext` before each call; the statistics travel with the decoding cache object
(they are attached to it after each call and reordered with it in beam search).

``sequence`` routing pools over a sample's *prompt*, one definition for training and generation: in
``generate`` the prompt is the input given; in a causal LM's forward with ``labels`` it is the valid
tokens without a label (-100), i.e. the prompt when only the response is trained; otherwise every valid
token. The hooks also refuse, in causal-LM training, a routing mode whose mix would let later tokens
steer earlier predictions (see :meth:`LilyConfig.lookahead_problem`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_CACHE_ATTR = "_lily_ssm_router_stats"
_CACHE_KWARGS = ("cache", "past_key_values", "cache_params")


@dataclass
class RouterStats:
    """Running sum of per-token router probabilities over valid tokens, and the token count."""

    total: torch.Tensor  # (batch, num_B), float32
    count: torch.Tensor  # (batch, 1), float32

    def index_select(self, index: torch.Tensor) -> RouterStats:
        index = index.to(self.total.device)
        return RouterStats(self.total.index_select(0, index), self.count.index_select(0, index))

    def repeat_interleave(self, repeats: int) -> RouterStats:
        return RouterStats(self.total.repeat_interleave(repeats, 0), self.count.repeat_interleave(repeats, 0))


@dataclass
class RoutingContext:
    """Per-call routing inputs shared by every Lily layer of one model.

    The context outlives the call on purpose: activation checkpointing re-runs layers during the
    backward pass and must see the same mask.
    """

    mask: torch.Tensor | None = None
    prompt: torch.Tensor | None = None  # (batch, tokens) bool: the tokens sequence routing pools over
    incoming: dict[str, RouterStats] = field(default_factory=dict)
    outgoing: dict[str, RouterStats] = field(default_factory=dict)
    prefix_len: int | None = None  # set during generate(): sequence routing pools over the prompt only
    recorder: Any = None  # analysis.routing.RouterRecorder while router weights are being recorded
    labels_mark_prompt: bool = False  # set by apply_adapter for sequence routing on a causal LM
    lookahead_problem: Any = None  # the config's LilyConfig.lookahead_problem, checked in causal-LM training

    def token_mask(self, batch: int, tokens: int) -> torch.Tensor | None:
        """The padding mask aligned with a ``(batch, tokens, features)`` input, or None."""
        return self._aligned(self.mask, batch, tokens)

    def prompt_mask(self, batch: int, tokens: int) -> torch.Tensor | None:
        """The tokens sequence routing pools over, aligned like :meth:`token_mask`, or None (all valid)."""
        return self._aligned(self.prompt, batch, tokens)

    @staticmethod
    def _aligned(mask: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < tokens:
            raise ValueError(
                f"attention mask of shape {tuple(mask.shape)} does not fit an adapter input of "
                f"{batch} samples x {tokens} tokens; call the model that apply_adapter() returned, "
                "not one of its submodules, so the mask of the current call reaches the routers"
            )
        return mask[:, mask.shape[1] - tokens :]


class _StatsReorderingCache:
    """Wraps a cache's batch-reordering methods so router statistics follow beam search."""

    @staticmethod
    def install(cache: Any, stats: dict[str, RouterStats]) -> None:
        already = hasattr(cache, _CACHE_ATTR)
        object.__setattr__(cache, _CACHE_ATTR, stats)
        if already:
            return
        for method, transform in (
            ("reorder_cache", lambda s, idx: s.index_select(idx)),
            ("batch_select_indices", lambda s, idx: s.index_select(idx)),
            ("batch_repeat_interleave", lambda s, n: s.repeat_interleave(n)),
        ):
            original = getattr(cache, method, None)
            if original is None:
                continue

            def wrapped(arg, _original=original, _transform=transform):
                result = _original(arg)
                current = getattr(cache, _CACHE_ATTR)
                for key in list(current):
                    current[key] = _transform(current[key], arg)
                return result

            object.__setattr__(cache, method, wrapped)


def router_stats(cache: Any) -> dict[str, RouterStats]:
    """The router statistics a decoding cache carries for its next call (empty before the first)."""
    return dict(getattr(cache, _CACHE_ATTR, None) or {})


def set_router_stats(cache: Any, stats: dict[str, RouterStats]) -> None:
    """Make ``stats`` the router statistics ``cache``'s next call continues from (they follow beam search)."""
    _StatsReorderingCache.install(cache, stats)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts each token from the ones before it (a text generator)."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate):
        try:
            if can_generate():
                return True
        except Exception:  # a model's own can_generate may need state it lacks; fall back to the name
            pass
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def prompt_from_labels(labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per sample, its valid tokens without a label (-100): the prompt when only the response is trained.
    A sample in which every valid token has a label has no prompt and pools over all its valid tokens."""
    valid = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    prompt = valid & (labels == -100)
    return torch.where(prompt.any(1, keepdim=True), prompt, valid)


def _leaks(labels: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether a sample pools a token its model is asked to predict, or a later one: logits at position t
    predict labels[t + 1] and may see inputs up to t, so every pooled position must precede the first
    predicted token."""
    t = labels.shape[1]
    positions = torch.arange(t, device=labels.device).expand_as(labels)
    target = labels != -100
    target[:, 0] = False  # labels[0] is never predicted
    first_target = torch.where(target, positions, t).amin(1)
    last_pooled = torch.where(pool, positions, -1).amax(1)
    return bool((target.any(1) & (last_pooled >= first_target)).any())


def _find_cache(arguments: dict[str, Any]) -> Any:
    for name in _CACHE_KWARGS:
        if arguments.get(name) is not None:
            return arguments[name]
    return None


def _output_cache(output: Any) -> Any:
    # Iterate the output's own keys: asking a transformers ModelOutput for a legacy cache name warns.
    items = output.items() if isinstance(output, dict) else ()
    return next((value for key, value in items if key in _CACHE_KWARGS and value is not None), None)


class _RoutingHooks:
    """Forward pre/post hooks feeding one model's :class:`RoutingContext`.

    Hooks and the ``generate`` wrapper are objects, not closures, so ``copy.deepcopy`` of an adapted
    model gives the copy hooks bound to its own context and its own ``generate``.
    """

    def __init__(self, context: RoutingContext, parameter_names: list[str]) -> None:
        self.context = context
        self.parameter_names = parameter_names

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = {**dict(zip(self.parameter_names, args)), **kwargs}
        mask = arguments.get("attention_mask")
        self.context.mask = mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        labels = arguments.get("labels")
        token_labels = self.context.labels_mark_prompt and isinstance(labels, torch.Tensor) and labels.dim() == 2
        self.context.prompt = prompt_from_labels(labels, mask) if token_labels else None
        if self.context.lookahead_problem is not None and module.training:
            self._check_lookahead(labels if token_labels else None)
        cache = _find_cache(arguments)
        self.context.incoming = (getattr(cache, _CACHE_ATTR, None) or {}) if cache is not None else {}
        self.context.outgoing = {}

    def _check_lookahead(self, labels: torch.Tensor | None) -> None:
        """Raise if this training call's routing lets later tokens steer earlier predictions."""
        problem = self.context.lookahead_problem(train_on_inputs=False)
        if problem is None and (labels is None or _leaks(labels, self.context.prompt)):
            problem = self.context.lookahead_problem(train_on_inputs=True)
        if problem is not None:
            raise ValueError(f"causal-LM training with future-token leakage: {problem}")

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = _output_cache(output)
        if cache is not None and self.context.outgoing:
            _StatsReorderingCache.install(cache, self.context.outgoing)


class _PromptRoutedGenerate:
    """``generate`` with sequence routing pooled over the prompt only.

    With a cache, the prompt's router mix is fixed at prefill and reused for every new token; pinning
    the uncached path to the same prompt-only mix makes cached and uncached decoding agree.
    """

    def __init__(self, generate: Any, context: RoutingContext) -> None:
        self.generate = generate  # a bound method: deepcopy rebinds it to the copied model
        self.context = context
        functools.update_wrapper(self, generate)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        prompt = next((kwargs[k] for k in ("input_ids", "inputs", "inputs_embeds") if kwargs.get(k) is not None),
                      args[0] if args else None)
        self.context.prefix_len = prompt.shape[1] if isinstance(prompt, torch.Tensor) else None
        try:
            return self.generate(*args, **kwargs)
        finally:
            self.context.prefix_len = None


def install_routing_hooks(model: nn.Module, context: RoutingContext) -> list[Any]:
    """Register the hooks that feed ``context`` on every call of ``model``; returns the handles."""
    hooks = _RoutingHooks(context, list(inspect.signature(model.forward).parameters))
    handles = [
        model.register_forward_pre_hook(hooks.before, with_kwargs=True),
        model.register_forward_hook(hooks.after, with_kwargs=True),
    ]
    generate = getattr(model, "generate", None)
    if callable(generate):
        model.generate = _PromptRoutedGenerate(generate, context)
    return handles


def remove_routing_hooks(model: nn.Module, handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    if isinstance(model.__dict__.get("generate"), _PromptRoutedGenerate):
        del model.generate

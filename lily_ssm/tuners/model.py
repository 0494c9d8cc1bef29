"""Injecting adapters into a model, and taking them out again (merge)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..modules.registry import patch_mamba_mixers
from .base import AdaptedLinear, AdapterConfig, AdapterPool
from .blocks import attach_parallel, detach_parallel
from .liveness import LivenessCheck, install_liveness_check
from .routing import RoutingContext, install_routing_hooks, is_causal_lm, remove_routing_hooks
from .targets import TargetGroup, find_targets

ADAPTER_ATTR = "lily_ssm_adapter"
MERGED_ATTR = "lily_ssm_merged"  # on model.config: content hashes of the adapters merged into the weights

# Config attributes recorded to identify the base model an adapter was made for.
_DIMENSION_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "state_size", "time_step_rank",
    "conv_kernel", "vocab_size", "num_attention_heads", "num_key_value_heads", "d_model", "d_inner", "depth",
    "embed_dim",
)


class PoolDict(nn.ModuleDict):
    """The pools by target type. Keys such as ``in_proj.x`` hold a dot, which module names cannot, so
    they are escaped in the module tree (and so in the model's state dict) and nowhere else."""

    @staticmethod
    def _escape(key: str) -> str:
        return key.replace("%", "%25").replace(".", "%2E")

    @staticmethod
    def _unescape(name: str) -> str:
        return name.replace("%2E", ".").replace("%25", "%")

    def __init__(self, pools: Mapping[str, AdapterPool]) -> None:
        super().__init__({self._escape(k): v for k, v in pools.items()})

    def __getitem__(self, key: str) -> AdapterPool:
        return super().__getitem__(self._escape(key))  # type: ignore[return-value]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(self._escape(key))

    def __iter__(self) -> Iterator[str]:
        return (self._unescape(name) for name in super().__iter__())

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(self)

    def items(self) -> list[tuple[str, AdapterPool]]:  # type: ignore[override]
        return [(self._unescape(name), pool) for name, pool in super().items()]


class AdapterState(nn.Module):
    """Registered on the adapted model as ``lily_ssm_adapter``: the pools, config and routing context."""

    def __init__(self, config: AdapterConfig, groups: list[TargetGroup], pools: dict[str, AdapterPool],
                 context: RoutingContext, base_model: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.groups = {g.key: g for g in groups}
        self.pools = PoolDict(pools)
        self.context = context
        self.base_model = base_model
        self.saved: dict[str, nn.Parameter] = {}  # modules_to_save parameters (owned by the model, not here)
        self.hook_handles: list[Any] = []

    def modules_shapes(self) -> dict[str, list[int]]:
        return modules_shapes(self.groups.values())

    def layout(self) -> dict[str, dict[str, Any]]:
        return groups_layout(self.groups.values())

    def tensors(self) -> dict[str, nn.Parameter]:
        """Every adapter tensor once, keyed ``<target type>.<kind>``, plus ``modules_to_save.<path>``."""
        return {**pool_tensors(self.pools), **self.saved}


def modules_shapes(groups: Iterable[TargetGroup]) -> dict[str, list[int]]:
    """``[in, out]`` of every adapted slot, by slot key (as saved with an adapter)."""
    return {m.key: [m.in_features, m.out_features] for g in groups for m in g.modules}


def groups_layout(groups: Iterable[TargetGroup]) -> dict[str, dict[str, Any]]:
    """Per target type, its layer count and its slots in layer order with their positions (saved
    with the adapter so it can be analysed without the base model)."""
    return {g.key: {"num_layers": g.num_layers, "modules": [[m.key, m.position] for m in g.modules]}
            for g in groups}


SAVED_PREFIX = "modules_to_save."


def modules_to_save_params(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    """Parameters of the modules named (by suffix) in ``names``, keyed ``modules_to_save.<path>``."""
    found: dict[str, nn.Parameter] = {}
    for suffix in names:
        hits = [(n, m) for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix)]
        if not hits:
            top = sorted({n.split(".")[0] for n, _ in model.named_modules() if n})
            raise ValueError(f"modules_to_save entry {suffix!r} matches no module of {type(model).__name__}; "
                             f"top-level modules: {', '.join(top)}")
        for name, module in hits:
            for pname, param in module.named_parameters():
                found[f"{SAVED_PREFIX}{name}.{pname}"] = param
    return found


def pool_tensors(pools: Mapping[str, AdapterPool]) -> dict[str, nn.Parameter]:
    """The tensors of ``pools`` keyed ``<target type>.<kind>``: the names adapters are saved under."""
    return {f"{key}.{kind}": p for key, pool in pools.items() for kind, p in pool.parameter_kinds().items()}


def describe_base_model(model: nn.Module) -> dict[str, Any]:
    """Architecture and dimensions of ``model``, as recorded in saved adapters."""
    config = getattr(model, "config", None)
    dims = {}
    for key in _DIMENSION_KEYS:
        value = getattr(config, key, None) if config is not None else getattr(model, key, None)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            dims[key] = value
    return {"architecture": type(model).__name__, "dimensions": dims}


def get_adapter_state(model: nn.Module) -> AdapterState:
    state = getattr(model, ADAPTER_ATTR, None)
    if not isinstance(state, AdapterState):
        raise ValueError(f"{type(model).__name__} has no adapter; call lily_ssm.apply_adapter(model, config) first")
    return state


def _pool_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Adapter weights live beside the module's weight; half-precision bases get fp32 adapters so small
    optimizer steps are not rounded away. A module offloaded by accelerate (weight on ``meta``) runs on
    its hook's execution device. A block target's adapter lives beside the block's first parameter."""
    weight = module.weight if isinstance(module, nn.Linear) else next(module.parameters())
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    device = weight.device
    hook = getattr(module, "_hf_hook", None)
    if device.type == "meta" and getattr(hook, "execution_device", None) is not None:
        device = torch.device(hook.execution_device)
    return dtype, device


def plan_pools(model: nn.Module, config: AdapterConfig, context: RoutingContext,
               device: torch.device | None = None) -> tuple[list[TargetGroup], dict[str, AdapterPool]]:
    """The target groups of ``config`` in ``model`` and a fresh pool for each, without changing the
    model; ``device`` overrides where the pools are built (``meta`` to only work out shapes)."""
    config.validate()
    config = config.resolve(model)
    groups = find_targets(model, config.targets)
    config.check_overrides([g.key for g in groups])
    pools: dict[str, AdapterPool] = {}
    for group in groups:
        dtype, where = _pool_dtype_device(model.get_submodule(group.modules[0].name))
        pools[group.key] = config.build_pool(group, context, dtype, device or where)
    return groups, pools


def apply_adapter(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Inject the adapter ``config`` describes into ``model`` in place, freeze the base, return the model.

    Mamba mixers (HF ``MambaMixer`` / ``FalconMambaMixer``) get this toolkit's forward, which calls
    every projection through its module, so adapters on ``dt_proj``, ``x_proj`` and ``out_proj`` run.
    The config's model-dependent defaults are resolved for ``model`` (Lily's ``routing="auto"``); the
    resolved config is the one recorded and saved. On a causal LM, a training call whose routing would
    let later tokens steer earlier predictions raises (see ``LilyConfig.lookahead_problem``).
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a LilyConfig or LoraConfig, got {type(config).__name__}")
    if isinstance(getattr(model, ADAPTER_ATTR, None), AdapterState):
        raise ValueError(f"{type(model).__name__} already has an adapter; apply_adapter works on a base model")
    config = config.resolve(model)
    causal_lm = is_causal_lm(model)
    context = RoutingContext(labels_mark_prompt=causal_lm and getattr(config, "routing", None) == "sequence")
    groups, pools = plan_pools(model, config, context)
    lookahead = getattr(config, "lookahead_problem", None)
    if causal_lm and lookahead is not None and lookahead(train_on_inputs=True) is not None:
        context.lookahead_problem = lookahead  # checked on every training call

    saved = modules_to_save_params(model, list(getattr(config, "modules_to_save", [])))
    base_model = describe_base_model(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in saved.values():
        param.requires_grad_(True)
    patch_mamba_mixers(model)
    for group in groups:
        for slot in group.modules:
            module = model.get_submodule(slot.name)
            if isinstance(module, nn.Linear):
                AdaptedLinear.wrap(module, pools[group.key], slot)
            else:  # a block target (ViT's mlp): the adapter runs parallel to the whole block
                attach_parallel(module, pools[group.key], slot)

    state = AdapterState(config, groups, pools, context, base_model)
    state.saved = saved
    setattr(model, ADAPTER_ATTR, state)
    state.hook_handles = install_routing_hooks(model, context)
    adapted = {slot.name: model.get_submodule(slot.name) for group in groups for slot in group.modules}
    check = LivenessCheck(model, adapted)
    for module in adapted.values():
        object.__setattr__(module, "_lily_liveness", check)
    state.hook_handles += install_liveness_check(model, check)
    return model


def _remove_adapter(model: nn.Module, state: AdapterState) -> None:
    for name in {slot.name for group in state.groups.values() for slot in group.modules}:
        module = model.get_submodule(name)
        if isinstance(module, AdaptedLinear):
            module.unwrap()
        else:
            detach_parallel(module)
    remove_routing_hooks(model, state.hook_handles)
    delattr(model, ADAPTER_ATTR)


def adapter_content_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 of adapter tensors: their sorted names, dtypes, shapes and bytes. ``save_adapter``
    records it as ``content_sha256`` and ``merge_adapter`` on the model, so the same weights are
    recognised in memory and on disk."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        head = json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)])
        digest.update(head.encode() + b"\0")
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def merged_adapters(model: nn.Module) -> list[str]:
    """The content hashes of the adapters ``merge_adapter`` folded into ``model`` (kept on its config,
    so ``save_pretrained`` writes them to config.json and a reload keeps them)."""
    holder = getattr(model, "config", None)
    recorded = getattr(holder if holder is not None else model, MERGED_ATTR, None)
    return [h for h in recorded if isinstance(h, str)] if isinstance(recorded, (list, tuple)) else []


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold a LoRA adapter into the base weights and remove it; returns the plain model.

    The adapter's content hash is recorded (``model.config.lily_ssm_merged``), so ``load_adapter``
    refuses to apply the same adapter again on top of the merged weights.

    Lily cannot be merged: its update ``A_g (Σ_i S_i B_i)`` depends on the router weights ``S``, which
    are computed from each input, so no single ΔW reproduces it.
    """
    state = get_adapter_state(model)
    parallel = [key for key, group in state.groups.items() if group.activation is not None]
    if parallel:
        raise ValueError(f"the adapter on {', '.join(parallel)} runs parallel to a whole block with a nonlinearity "
                         "between A and B, so no weight update reproduces it; keep the adapter attached")
    if state.config.method == "lily":
        raise ValueError(
            "Lily adapters cannot be merged into the base weights: each layer's update A_g·(Σ_i S_i·B_i) mixes "
            "the B experts with router weights S computed from the input, so ΔW differs for every input. "
            "Keep the adapter attached (or use LoRA if you need a mergeable baseline)."
        )
    with torch.no_grad():
        for key, group in state.groups.items():
            pool = state.pools[key]
            for slot in group.modules:
                weight = model.get_submodule(slot.name).weight
                update = pool.delta_weight(slot).to(weight.dtype)
                if slot.out_slice is not None:  # the part's rows: out_slice of each of out_groups blocks
                    start, stop = slot.out_slice
                    weight = weight.unflatten(0, (slot.out_groups, -1))[:, start:stop]
                    update = update.unflatten(0, (slot.out_groups, stop - start))
                weight += update
    content = adapter_content_sha256(state.tensors())
    _remove_adapter(model, state)
    holder = getattr(model, "config", None)
    setattr(holder if holder is not None else model, MERGED_ATTR, [*merged_adapters(model), content])
    return model

"""PEFT adapter folders in and out: LoRA both ways, Lily both ways where PEFT's Lily can express it.

PEFT stores one tensor per adapted module under ``base_model.model.<path>.<kind>.weight`` (nn.Linear
layout, ``(out, in)``), with Lily's shared A and B repeated in every layer that shares them. lily-ssm
stores each shared tensor once, per target type (``<type>.A`` ``(n, in, r)``, ``<type>.B``
``(n, r, out)``). The translation goes through the pools' own indexing (:meth:`LoraPool.index`,
:meth:`LilyPool.a_index`), so the two layouts cannot drift apart, and an import checks that every
tensor PEFT repeats is identical wherever lily-ssm keeps one copy.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ..modules.registry import MAMBA2_MIXERS
from ..tuners import LilyConfig, LoraConfig
from ..tuners.base import AdapterConfig
from ..tuners.model import SAVED_PREFIX, plan_pools, pool_tensors
from ..tuners.routing import RoutingContext, is_causal_lm
from ..tuners.targets import TargetGroup, find_targets
from ..utils.atomic import write_atomic
from ..utils.safe_load import AdapterLoadError, check_adapter_tensor

logger = logging.getLogger("lily_ssm")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
PEFT_TYPES = ("LORA", "LILY")
_KINDS = {"LORA": ("lora_A", "lora_B"), "LILY": ("lily_A", "lily_B", "lily_router")}

# transformers' Mamba-1 mixers compute Δ as ``dt_proj.weight @ x``: an adapter on dt_proj never runs there.
_DT_BYPASSING_MIXERS = ("MambaMixer", "FalconMambaMixer", "JambaMambaMixer")
# PEFT refuses LoRA on out_proj for these model types (the fused CUDA path takes out_proj.weight)...
_PEFT_NO_OUT_PROJ = ("falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h")
# ... and these mixers' fused CUDA training paths take out_proj.weight (x_proj.weight too, on Mamba-1).
_FUSED_TRAINING_MIXERS = ("MambaMixer", "FalconMambaMixer")
_OUT_PROJ_BYPASSING_MIXERS = _FUSED_TRAINING_MIXERS + MAMBA2_MIXERS

# Settings lily-ssm reproduces, and the value of every other PEFT setting that changes nothing.
_LORA_HANDLED = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern",
                 "alpha_pattern", "use_rslora", "modules_to_save", "layers_to_transform", "layers_pattern"}
_LILY_HANDLED = {"peft_type", "r", "stride_A", "num_B", "scaling", "target_modules", "exclude_modules",
                 "modules_to_save", "layers_to_transform", "layers_pattern"}
_INERT = {"base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version", "auto_mapping",
          "init_weights", "megatron_core", "qalora_group_size"}
_LORA_INITS = (True, False, "gaussian")  # other inits (pissa, olora, loftq, ...) also change the base weights


@dataclass
class Translated:
    """An adapter in lily-ssm's layout: the config, its target groups on the model, and the tensors
    keyed as :meth:`AdapterState.tensors` keys them."""

    config: AdapterConfig
    groups: list[TargetGroup]
    tensors: dict[str, torch.Tensor]


def is_peft_folder(folder: str | Path) -> bool:
    """Whether ``folder``'s adapter_config.json is PEFT's (it names a ``peft_type``)."""
    path = Path(folder) / CONFIG_NAME
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False  # the caller's reader reports a missing or unreadable file
    return isinstance(meta, dict) and "peft_type" in meta


def read_peft_folder(folder: str | Path, allow_non_finite: bool = False) -> tuple[dict[str, Any],
                                                                                    dict[str, torch.Tensor]]:
    """A PEFT adapter folder's config and tensors (keys without PEFT's ``base_model.model.`` prefix), each
    tensor checked as lily-ssm's own are; pickled weights (``adapter_model.bin``) are refused."""
    folder = Path(folder)
    config_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{config_path} is not valid JSON: {exc}") from exc
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if kind not in PEFT_TYPES:
        raise AdapterLoadError(f"{config_path}: PEFT adapter type {kind!r}; lily-ssm reads PEFT's "
                               f"{' and '.join(PEFT_TYPES)} adapters")
    if not weights.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise AdapterLoadError(f"{folder} holds {PICKLE_NAME}, a pickle, which lily-ssm never loads; save it with "
                                   f"PEFT's save_pretrained(..., safe_serialization=True) to get {WEIGHTS_NAME}")
        raise FileNotFoundError(f"{weights} is missing; a PEFT adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = load_safetensors(weights.read_bytes())
    except Exception as exc:  # safetensors raises its own error types on malformed files
        raise AdapterLoadError(f"{weights} is not a readable safetensors file: {exc}") from exc
    tensors = {}
    for key, tensor in raw.items():
        check_adapter_tensor(key, tensor, weights, allow_non_finite)
        tensors[key.removeprefix(PREFIX)] = tensor
    return config, tensors


def _refuse_unhandled(config: dict[str, Any], handled: set[str], where: Path | str) -> None:
    """Refuse PEFT settings lily-ssm does not reproduce (DoRA, biases, ...), naming them."""
    inert_values = (None, False, {}, [], "none", 0, 0.0)
    odd = {k: v for k, v in config.items() if k not in handled | _INERT and v not in inert_values}
    if config.get("peft_type") == "LORA":
        init = odd.pop("init_lora_weights", True)
        if init not in _LORA_INITS:
            odd["init_lora_weights"] = init
    if odd:
        shown = ", ".join(f"{k}={json.dumps(v)[:40]}" for k, v in sorted(odd.items()))
        raise AdapterLoadError(f"{where}: PEFT setting(s) {shown} change what the adapter computes, and lily-ssm does "
                               "not reproduce them; only plain LoRA (with rank/alpha patterns, rsLoRA, dropout, "
                               "modules_to_save) and Lily import")


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


PerModule = dict[str, dict[str, torch.Tensor]]


def _split_keys(tensors: dict[str, torch.Tensor], kinds: tuple[str, ...], saved: list[str],
                where: Path | str) -> tuple[PerModule, dict[str, torch.Tensor]]:
    """Per adapted module path, its tensors by kind; and the modules_to_save tensors by parameter path."""
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    pattern = re.compile(rf"^(.+)\.({'|'.join(kinds)})\.weight$")
    for key, tensor in tensors.items():
        found = pattern.match(key)
        if found:
            per_module.setdefault(found.group(1), {})[found.group(2)] = tensor
        elif any(f".{s}." in f".{key}" for s in saved):  # a parameter of a module named by modules_to_save
            extra[key] = tensor
        else:
            raise AdapterLoadError(f"{where}: tensor {key!r} is neither a {'/'.join(kinds)} weight nor a "
                                   "modules_to_save parameter; lily-ssm does not know what it does")
    if not per_module:
        raise AdapterLoadError(f"{where} holds no {'/'.join(kinds)} weights")
    for path, found_kinds in per_module.items():
        missing = [k for k in kinds if k not in found_kinds and k != "lily_router"]
        if missing:
            raise AdapterLoadError(f"{where}: {path} has no {', '.join(missing)} weight")
    return per_module, extra


def _targets_for(model: nn.Module, config: dict[str, Any], paths: list[str]) -> str | list[str]:
    """PEFT's own target list when it is module names that select exactly the saved modules here, else
    an exact-path regex (whose matches lily-ssm groups by module name, as it groups a list's)."""
    listed = config.get("target_modules")
    if isinstance(listed, list) and listed and all(isinstance(t, str) and "." not in t for t in listed):
        try:
            matched = {m.name for g in find_targets(model, listed) for m in g.modules if m.part is None}
        except ValueError:
            matched = set()
        if matched == set(paths):
            return sorted(listed)
    return "|".join(re.escape(p) for p in paths)


def _check_paths(model: nn.Module, paths: list[str], where: Path | str) -> None:
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise AdapterLoadError(f"{where} adapts {', '.join(missing[:4])}, which {type(model).__name__} does not have: "
                               "it was made for another base model")
    wrong = [p for p in paths if type(modules[p]) is not nn.Linear]
    if wrong:
        raise AdapterLoadError(f"{where} adapts {', '.join(wrong[:4])}, which are not nn.Linear layers here")


def _saved_tensors(model: nn.Module, extra: dict[str, torch.Tensor], where: Path | str) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    out = {}
    for key, tensor in extra.items():
        if key not in params:
            raise AdapterLoadError(f"{where}: modules_to_save parameter {key} does not exist in {type(model).__name__}")
        if list(params[key].shape) != list(tensor.shape):
            raise AdapterLoadError(f"{where}: modules_to_save parameter {key} is {list(tensor.shape)}, the model's is "
                                   f"{list(params[key].shape)}")
        out[SAVED_PREFIX + key] = tensor
    return out


def _one_copy(values: list[torch.Tensor], what: str, where: Path | str) -> torch.Tensor:
    """The tensor PEFT repeated in every layer that shares it; all copies must agree."""
    if any(not torch.equal(values[0], v) for v in values[1:]):
        raise AdapterLoadError(f"{where}: {what} differs between layers that share it in lily-ssm's layout; PEFT "
                               "grouped these layers differently, so the adapter cannot be imported exactly")
    return values[0]


def peft_to_lily(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                 where: Path | str = "PEFT adapter") -> Translated:
    """Translate a PEFT LoRA or Lily adapter (config + tensors) into lily-ssm's layout on ``model``.

    LoRA keeps each module's rank and scaling (rank_pattern, alpha_pattern, rsLoRA) as per-target
    overrides. Lily gets PEFT's semantics: ``routing="batch"`` (one mix per batch), one router per
    layer, and PEFT's A grouping (``stride_A``).
    """
    kind = config["peft_type"]
    _refuse_unhandled(config, _LORA_HANDLED if kind == "LORA" else _LILY_HANDLED, where)
    saved = list(config.get("modules_to_save") or [])
    per_module, extra = _split_keys(tensors, _KINDS[kind], saved, where)
    order = [n for n, _ in model.named_modules() if n in per_module]
    _check_paths(model, sorted(per_module), where)
    targets = _targets_for(model, config, order)
    if kind == "LORA":
        ours = _lora_config(config, targets, per_module, order, model, saved, where)
    else:
        ours = _lily_config(config, targets, model, saved, where)
    groups, pools = plan_pools(model, ours, RoutingContext(), device=torch.device("meta"))
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        pool = pools[group.key]
        slots = [(slot, per_module[slot.name]) for slot in group.modules]
        if kind == "LORA":
            out[f"{group.key}.A"] = torch.stack([t["lora_A"].T for _, t in slots])
            out[f"{group.key}.B"] = torch.stack([t["lora_B"].T for _, t in slots])
            continue
        r, num_B = pool.config.r, pool.config.num_B
        a = [_one_copy([t["lily_A"].T for s, t in slots if pool.a_index(s) == g], f"lily_A of {group.key} group {g}",
                       where) for g in range(pool.config.num_A)]
        out[f"{group.key}.A"] = torch.stack(a)
        b = _one_copy([t["lily_B"] for _, t in slots], f"lily_B of {group.key}", where)
        out[f"{group.key}.B"] = b.reshape(num_B, r, group.out_features)
        if pool.router is not None:
            out[f"{group.key}.router"] = torch.stack([
                _one_copy([t["lily_router"] for s, t in slots if pool.router_index(s) == i],
                          f"lily_router of {group.key} layer {i}", where) for i in range(pool.router.shape[0])])
    out.update(_saved_tensors(model, extra, where))
    planned = {key: list(p.shape) for key, p in pool_tensors(pools).items()}
    actual = {key: list(t.shape) for key, t in out.items() if not key.startswith(SAVED_PREFIX)}
    if planned != actual:
        raise AdapterLoadError(f"{where}: its tensors have shapes {actual}, but its config gives {planned} on "
                               f"{type(model).__name__}")
    _warn_dead_in_peft(model, groups, out, where)
    if kind == "LILY":
        logger.warning(f"{where}: PEFT's Lily mixes its B experts once per batch (routing='batch'), so each output "
                       "depends on every token of its batch, padding and the other rows included; evaluate with "
                       "batch size 1 for per-example results")
    return Translated(ours, groups, out)


def _lora_config(config: dict[str, Any], targets: str | list[str], per_module: PerModule,
                 order: list[str], model: nn.Module, saved: list[str], where: Path | str) -> LoraConfig:
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora"))
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def scaled_alpha(alpha: float, r: int) -> float:  # lily-ssm scales by alpha / r; rsLoRA by alpha / sqrt(r)
        return alpha * r / math.sqrt(r) if rslora else alpha

    per_path: dict[str, tuple[int, float]] = {}
    for path in order:
        r = int(per_module[path]["lora_A"].shape[0])
        if r != _pattern_value(ranks, path, r0):
            raise AdapterLoadError(f"{where}: {path}'s lora_A has rank {r}, its config gives "
                                   f"{_pattern_value(ranks, path, r0)}")
        per_path[path] = (r, scaled_alpha(float(_pattern_value(alphas, path, alpha0)), r))
    dropout = float(config.get("lora_dropout") or 0.0)
    probe = LoraConfig(targets, r=r0, alpha=scaled_alpha(float(alpha0), r0), dropout=dropout)
    overrides: dict[str, dict[str, Any]] = {}
    for group in find_targets(model, targets):
        values = {per_path[m.name] for m in group.modules}
        if len(values) > 1:
            raise AdapterLoadError(f"{where}: the {group.key} modules have different (rank, alpha) {sorted(values)}; "
                                   "lily-ssm sets them per module type, so this adapter cannot be imported exactly")
        (r, alpha), = values
        if (r, alpha) != (probe.r, probe.alpha):
            overrides[group.key] = {"r": r, "alpha": alpha}
    probe.overrides, probe.modules_to_save = overrides, saved
    return probe


def _lily_config(config: dict[str, Any], targets: str | list[str], model: nn.Module, saved: list[str],
                 where: Path | str) -> LilyConfig:
    stride, r, num_b = config.get("stride_A", 1), config.get("r", 8), config.get("num_B", 2)
    groups = find_targets(model, targets)
    num_a = {g.key: -(-g.num_layers // stride) for g in groups}
    first = num_a[groups[0].key]
    overrides = {key: {"num_A": n} for key, n in num_a.items() if n != first}
    return LilyConfig(targets, r=r, num_A=first, num_B=num_b, scaling=float(config.get("scaling", 1.0)),
                      routing="batch", router="layer", stride_A=stride, overrides=overrides, modules_to_save=saved)


def _warn_dead_in_peft(model: nn.Module, groups: list[TargetGroup], tensors: dict[str, torch.Tensor],
                       where: Path | str) -> None:
    """PEFT saves adapters on a Mamba-1 dt_proj but transformers never runs them; here they run."""
    for group in groups:
        dead = [m.name for m in group.modules if m.name.rsplit(".", 1)[-1] == "dt_proj"
                and _parent_kind(model, m.name) in _DT_BYPASSING_MIXERS]
        if not dead:
            continue
        untrained = not bool(tensors[f"{group.key}.B"].any())
        effect = ("its B weights are all zero (PEFT gave them no gradient), so it changes nothing until trained"
                  if untrained else "its weights are not zero, so outputs differ from PEFT's")
        logger.warning(f"{where}: PEFT saved an adapter on {len(dead)} dt_proj modules but never applied it "
                       "(transformers' Mamba mixers compute Δ with dt_proj.weight directly); lily-ssm applies it, so "
                       f"it is live now: {effect}")


def _parent_kind(model: nn.Module, name: str) -> str:
    parent = name.rpartition(".")[0]
    return type(model.get_submodule(parent)).__name__ if parent else ""


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------


def _export_problems(model: nn.Module, groups: list[TargetGroup]) -> list[str]:
    """Why PEFT on stock transformers would not compute what lily-ssm computes, per target type."""
    problems = []
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for group in groups:
        slot = group.modules[0]
        leaf, mixer = slot.name.rsplit(".", 1)[-1], _parent_kind(model, slot.name)
        if group.activation is not None:
            problems.append(f"{group.key}: the adapter runs parallel to a whole block with a {group.activation} "
                            "between A and B; PEFT adapts single layers")
        elif slot.part is not None:
            problems.append(f"{group.key}: PEFT adapts whole modules, not a part of a projection's output")
        elif leaf == "dt_proj" and mixer in _DT_BYPASSING_MIXERS:
            problems.append(f"{group.key}: transformers' {mixer} computes Δ with dt_proj.weight directly, so PEFT "
                            "would save the adapter and never apply it")
        elif leaf == "out_proj" and (model_type in _PEFT_NO_OUT_PROJ or mixer in _OUT_PROJ_BYPASSING_MIXERS):
            problems.append(f"{group.key}: transformers' fused CUDA training path for {mixer or model_type} passes "
                            "out_proj.weight straight to the kernel, so PEFT's adapter would be dead on GPUs (PEFT "
                            f"refuses LoRA on out_proj for {', '.join(_PEFT_NO_OUT_PROJ)} for this reason)")
    return problems


def _export_notes(model: nn.Module, groups: list[TargetGroup]) -> None:
    """Targets PEFT applies at inference but not in transformers' fused CUDA training path."""
    for group in groups:
        slot = group.modules[0]
        if slot.name.rsplit(".", 1)[-1] == "x_proj" and _parent_kind(model, slot.name) in _FUSED_TRAINING_MIXERS:
            logger.warning(f"{group.key}: PEFT applies this adapter in evaluation, but transformers' fused CUDA "
                           "training path (mamba_inner_fn) takes x_proj.weight directly, so training it further "
                           "with PEFT on a GPU would leave it dead")


def lily_to_peft(model: nn.Module, adapter: Translated) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT adapter_config.json mapping and its tensors for the adapter, or ``ValueError`` naming why
    PEFT cannot reproduce it (see :func:`_export_problems`; Lily also needs PEFT's routing)."""
    config, groups = adapter.config, adapter.groups
    problems = _export_problems(model, groups)
    if config.method == "lily":
        problems += _lily_export_problems(config, groups)
    if problems:
        raise ValueError("PEFT cannot reproduce this adapter: " + "; ".join(problems) + ". Save it in lily-ssm's "
                         "format, or (LoRA) merge it into the base weights with lily_ssm.merge_adapter and save the "
                         "full model with save_pretrained")
    _export_notes(model, groups)
    tensors: dict[str, torch.Tensor] = {}
    for group in groups:
        a, b = adapter.tensors[f"{group.key}.A"], adapter.tensors[f"{group.key}.B"]
        for i, slot in enumerate(group.modules):
            base = f"{PREFIX}{slot.name}."
            if config.method == "lora":
                tensors[base + "lora_A.weight"] = a[i].T.contiguous()
                tensors[base + "lora_B.weight"] = b[i].T.contiguous()
                continue
            stride = config.for_target(group.key)["stride_A"]
            tensors[base + "lily_A.weight"] = a[slot.position // stride].T.contiguous()
            tensors[base + "lily_B.weight"] = b.reshape(-1, group.out_features).contiguous()
            router = adapter.tensors.get(f"{group.key}.router")
            tensors[base + "lily_router.weight"] = (router[slot.position] if router is not None
                                                    else torch.zeros(1, a.shape[-1], dtype=a.dtype)).contiguous()
    for key, tensor in adapter.tensors.items():
        if key.startswith(SAVED_PREFIX):
            tensors[PREFIX + key.removeprefix(SAVED_PREFIX)] = tensor.contiguous()
    return _peft_config(model, config, groups), tensors


def _lily_export_problems(config: LilyConfig, groups: list[TargetGroup]) -> list[str]:
    problems = []
    if config.routing != "batch":
        problems.append(f"routing={config.routing!r}: PEFT's Lily mixes the B experts once per batch (routing='batch')")
    if config.router != "layer":
        problems.append(f"router={config.router!r}: PEFT's Lily has one router per layer")
    if config.dropout:
        problems.append(f"dropout={config.dropout}: PEFT's Lily has no dropout")
    if not isinstance(config.targets, list):
        problems.append("targets is a regex: PEFT's Lily would group every module it matches into one type")
    values = [config.for_target(g.key) for g in groups]
    if any(v["stride_A"] is None for v in values):
        problems.append("stride_A is not set: PEFT groups A experts by stride (layer ℓ uses A number ℓ // stride_A)")
    for key in ("r", "num_B", "scaling", "stride_A"):
        if len({v[key] for v in values}) > 1:
            problems.append(f"{key} differs per target type: PEFT's Lily has one {key}")
    return problems


def _peft_config(model: nn.Module, config: AdapterConfig, groups: list[TargetGroup]) -> dict[str, Any]:
    targets = (sorted({m.name for g in groups for m in g.modules}) if not isinstance(config.targets, list)
               else list(config.targets))
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    common = {
        "base_model_name_or_path": name,
        "target_modules": targets,
        "modules_to_save": list(config.modules_to_save) or None,
        "task_type": "CAUSAL_LM" if is_causal_lm(model) else None,
        "inference_mode": True,
    }
    if config.method == "lily":
        values = config.for_target(groups[0].key)
        return {"peft_type": "LILY", "r": values["r"], "stride_A": values["stride_A"], "num_B": values["num_B"],
                "scaling": values["scaling"], **common}
    rank_pattern, alpha_pattern = {}, {}
    for group in groups:
        values = config.for_target(group.key)
        for slot in group.modules:
            if values["r"] != config.r:
                rank_pattern[re.escape(slot.name)] = values["r"]
            if values["alpha"] != config.alpha:
                alpha_pattern[re.escape(slot.name)] = values["alpha"]
    return {"peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none", "use_rslora": False,
            "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, **common}


def write_peft_folder(folder: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write a PEFT adapter folder (weights first, then the config, each atomically)."""
    folder = Path(folder)
    # PEFT repeats shared tensors per layer; safetensors wants each stored in its own memory
    payload = save_safetensors({k: t.detach().to("cpu").clone() for k, t in tensors.items()},
                               metadata={"format": "pt"})
    write_atomic(folder / WEIGHTS_NAME, payload)
    write_atomic(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder

"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Every shared tensor is stored once (the pools, not per-layer views). The config records the base
model's architecture and dimensions and the adapted modules' shapes, and a SHA-256 of the weights
file, so loading onto another model or a damaged file fails loudly instead of half-loading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .tuners import config_from_dict
from .tuners.base import AdapterConfig
from .tuners.model import (
    ADAPTER_ATTR,
    apply_adapter,
    describe_base_model,
    get_adapter_state,
    modules_to_save_params,
    plan_pools,
    pool_tensors,
)
from .tuners.routing import RoutingContext
from .utils.atomic import write_atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be loaded onto the given model."""


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter of ``model`` to the folder ``path`` (created if needed); returns the folder."""
    state = get_adapter_state(model)
    folder = Path(path)
    tensors = {key: p.detach().to("cpu").contiguous() for key, p in state.tensors().items()}
    payload = save_safetensors(tensors, metadata={"format": "pt", "method": state.config.method})
    meta = {
        "format_version": FORMAT_VERSION,
        "config": state.config.to_dict(),
        "base_model": state.base_model,
        "modules": state.modules_shapes(),
        "groups": state.layout(),
        "tensors": {key: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for key, t in tensors.items()},
        "weights_sha256": hashlib.sha256(payload).hexdigest(),
    }
    # Weights first: a crash between the two renames leaves a checksum mismatch, which load reports.
    write_atomic(folder / WEIGHTS_NAME, payload)
    write_atomic(folder / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def _read_meta(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} is missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    try:
        meta = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{folder / CONFIG_NAME} is not valid JSON (truncated or corrupted?): {exc}") from exc
    missing = [k for k in ("format_version", "config", "base_model", "modules", "tensors", "weights_sha256")
               if k not in meta]
    if missing:
        raise AdapterLoadError(f"{folder / CONFIG_NAME} lacks {', '.join(missing)}; it was not written by lily-ssm")
    if meta["format_version"] != FORMAT_VERSION:
        raise AdapterLoadError(f"{folder / CONFIG_NAME} has format_version {meta['format_version']}; "
                               f"this lily-ssm reads version {FORMAT_VERSION}")
    return meta


def _compare(expected: dict[str, Any], actual: dict[str, Any], what: str) -> list[str]:
    return [f"{what} {key}: adapter has {expected.get(key)!r}, model has {actual.get(key)!r}"
            for key in sorted(set(expected) | set(actual)) if expected.get(key) != actual.get(key)]


def _read_tensors(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    payload = (folder / WEIGHTS_NAME).read_bytes()
    if hashlib.sha256(payload).hexdigest() != meta["weights_sha256"]:
        raise AdapterLoadError(
            f"{folder / WEIGHTS_NAME} does not match the checksum in {CONFIG_NAME}: the file is truncated, "
            "corrupted, or from another save"
        )
    try:
        tensors = load_safetensors(payload)
    except Exception as exc:  # safetensors raises its own error types on malformed files
        raise AdapterLoadError(f"{folder / WEIGHTS_NAME} is not a readable safetensors file: {exc}") from exc
    expected = {k: v["shape"] for k, v in meta["tensors"].items()}
    actual = {k: list(v.shape) for k, v in tensors.items()}
    if expected != actual:
        raise AdapterLoadError(f"{folder / WEIGHTS_NAME} holds tensors {actual}, {CONFIG_NAME} lists {expected}")
    return tensors


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An adapter folder's metadata and tensors (checksum- and shape-verified), without a model."""
    folder = Path(path)
    meta = _read_meta(folder)
    return meta, _read_tensors(folder, meta)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the adapter in folder ``path`` onto ``model`` (a base model, or one already adapted with
    the same config) and return it. Nothing is changed if the adapter does not fit the model."""
    folder = Path(path)
    meta = _read_meta(folder)
    try:
        config = config_from_dict(meta["config"])
    except ValueError as exc:
        raise AdapterLoadError(f"{folder / CONFIG_NAME}: {exc}") from exc

    existing = getattr(model, ADAPTER_ATTR, None)
    if existing is not None and existing.config.to_dict() != config.to_dict():
        raise AdapterLoadError(f"model already carries a different adapter ({existing.config.to_dict()}); "
                               "load onto the base model instead")

    made_for, actual = meta["base_model"], describe_base_model(model)
    problems = _compare({"architecture": made_for.get("architecture")}, {"architecture": actual["architecture"]},
                        "base model")
    problems += _compare(made_for.get("dimensions", {}), actual["dimensions"], "config")
    shapes: dict[str, list[int]] = {}
    if not problems:
        try:
            modules, shapes = _planned_layout(model, config)
        except ValueError as exc:
            problems.append(str(exc))
        else:
            problems += _compare(meta["modules"], modules, "module")
    if problems:
        raise AdapterLoadError(
            f"adapter {folder} was made for a different base model ({made_for.get('architecture')}): "
            + "; ".join(problems[:8])
        )

    tensors = _read_tensors(folder, meta)
    stored = {key: list(t.shape) for key, t in tensors.items()}
    if stored != shapes:
        raise AdapterLoadError(
            f"the config in {folder / CONFIG_NAME} implies adapter tensors {shapes}, but {WEIGHTS_NAME} holds {stored}"
        )
    if existing is None:
        apply_adapter(model, config)
    with torch.no_grad():
        for key, param in get_adapter_state(model).tensors().items():
            param.copy_(tensors[key].to(dtype=param.dtype, device=param.device))
    return model


def _planned_layout(model: nn.Module, config: AdapterConfig) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The adapted modules' shapes and the adapter tensors' shapes ``config`` gives on ``model``,
    worked out without changing the model (pools are built on the meta device)."""
    existing = getattr(model, ADAPTER_ATTR, None)
    if existing is not None:
        return existing.modules_shapes(), {key: list(p.shape) for key, p in existing.tensors().items()}
    groups, pools = plan_pools(model, config, RoutingContext(), device=torch.device("meta"))
    modules = {m.key: [m.in_features, m.out_features] for g in groups for m in g.modules}
    tensors = {**pool_tensors(pools), **modules_to_save_params(model, list(getattr(config, "modules_to_save", [])))}
    return modules, {key: list(p.shape) for key, p in tensors.items()}

"""lily-ssm's adapter folders (docs/design.md §6): ``adapter_config.json`` + ``adapter_model.safetensors``; PEFT folders
load too.

Every shared tensor is stored once (the pools, not per-layer views). The config records the base
model's architecture and dimensions, the adapted modules' shapes, each tensor's shape and dtype, a
SHA-256 of the weights file and a content hash of the tensors (``content_sha256``, the one
``merge_adapter`` records on a model), so loading onto another model, a damaged or hand-edited file,
non-finite weights, or an adapter already merged into the model fails loudly instead of half-loading.
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

from ..tuners import config_from_dict
from ..tuners.base import AdapterConfig
from ..tuners.model import (
    ADAPTER_ATTR,
    adapter_content_sha256,
    apply_adapter,
    describe_base_model,
    get_adapter_state,
    groups_layout,
    merged_adapters,
    modules_shapes,
    modules_to_save_params,
    plan_pools,
    pool_tensors,
)
from ..tuners.routing import RoutingContext
from ..utils.atomic import write_atomic
from ..utils.safe_load import AdapterLoadError, check_adapter_tensor, dtype_name
from . import peft
from .hub import resolve_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


SAVE_FORMATS = ("lily", "peft")


def save_adapter(model: nn.Module, path: str | os.PathLike, format: str = "lily") -> Path:
    """Write the adapter of ``model`` to the folder ``path`` (created if needed); returns the folder.

    ``format="peft"`` writes a PEFT adapter folder instead, which ``peft.PeftModel.from_pretrained``
    loads on the stock transformers model with the same outputs; adapters PEFT cannot reproduce
    (dt_proj on transformers' Mamba mixers, part targets, Lily routing other than PEFT's) are refused
    with the reason.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format={format!r}; choose one of {', '.join(SAVE_FORMATS)}")
    state = get_adapter_state(model)
    tensors = {key: p.detach().to("cpu").contiguous() for key, p in state.tensors().items()}
    adapter = peft.Translated(state.config, list(state.groups.values()), tensors)
    if format == "peft":
        return peft.write_peft_folder(path, *peft.lily_to_peft(model, adapter))
    return write_adapter(path, adapter, state.base_model)


def write_adapter(path: str | os.PathLike, adapter: peft.Translated, base_model: dict[str, Any]) -> Path:
    """Write ``adapter`` (a config, its target groups and tensors) for ``base_model`` (as
    :func:`~lily_ssm.tuners.model.describe_base_model` gives it) into the folder ``path``."""
    folder = Path(path)
    tensors = adapter.tensors
    payload = save_safetensors(tensors, metadata={"format": "pt", "method": adapter.config.method})
    meta = {
        "format_version": FORMAT_VERSION,
        "config": adapter.config.to_dict(),
        "base_model": base_model,
        "modules": modules_shapes(adapter.groups),
        "groups": groups_layout(adapter.groups),
        "tensors": {key: {"shape": list(t.shape), "dtype": dtype_name(t)} for key, t in tensors.items()},
        "weights_sha256": hashlib.sha256(payload).hexdigest(),
        "content_sha256": adapter_content_sha256(tensors),
    }
    # Weights first: a crash between the two renames leaves a checksum mismatch, which load reports.
    write_atomic(folder / WEIGHTS_NAME, payload)
    write_atomic(folder / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


_REQUIRED_KEYS = ("format_version", "config", "base_model", "modules", "tensors", "weights_sha256")


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _check_shape(meta: dict[str, Any], where: Path) -> None:
    """Refuse metadata of the wrong shape, naming the key and the expected type (the readers index it)."""
    def bad(key: str, value: Any, expected: str) -> AdapterLoadError:
        return AdapterLoadError(f"{where}: {key} is {_type_name(value)} {json.dumps(value)[:60]}, expected {expected}"
                                "; the file was edited or not written by lily-ssm")

    entries: list[tuple[str, Any, bool, str]] = [
        ("config", meta["config"], isinstance(meta["config"], dict), "an object (the adapter's settings)"),
        ("base_model", meta["base_model"], isinstance(meta["base_model"], dict),
         "an object with architecture and dimensions"),
        ("modules", meta["modules"], isinstance(meta["modules"], dict), "an object of module name -> [in, out]"),
        ("tensors", meta["tensors"], isinstance(meta["tensors"], dict),
         "an object of tensor name -> {shape, dtype}"),
        ("weights_sha256", meta["weights_sha256"], isinstance(meta["weights_sha256"], str), "a hex string"),
    ]
    if "content_sha256" in meta:
        entries.append(("content_sha256", meta["content_sha256"], isinstance(meta["content_sha256"], str),
                        "a hex string"))
    if "groups" in meta:
        entries.append(("groups", meta["groups"], isinstance(meta["groups"], dict),
                        "an object of target type -> {num_layers, modules}"))
    for key, value, ok, expected in entries:
        if not ok:
            raise bad(key, value, expected)
    base = meta["base_model"]
    if "architecture" in base and not isinstance(base["architecture"], str):
        raise bad("base_model.architecture", base["architecture"], "a string")
    if "dimensions" in base and not isinstance(base["dimensions"], dict):
        raise bad("base_model.dimensions", base["dimensions"], "an object")
    for name, shape in meta["modules"].items():
        if not (_int_list(shape) and len(shape) == 2):
            raise bad(f"modules[{name!r}]", shape, "[in_features, out_features]")
    for name, entry in meta["tensors"].items():
        if not isinstance(entry, dict):
            raise bad(f"tensors[{name!r}]", entry, "an object {shape, dtype}")
        if not _int_list(entry.get("shape")):
            raise bad(f"tensors[{name!r}].shape", entry.get("shape"), "a list of sizes")
        if "dtype" in entry and not isinstance(entry["dtype"], str):
            raise bad(f"tensors[{name!r}].dtype", entry["dtype"], "a dtype name such as float32")
    for key, layout in meta.get("groups", {}).items():
        if not isinstance(layout, dict):
            raise bad(f"groups[{key!r}]", layout, "an object {num_layers, modules}")
        layers, slots = layout.get("num_layers"), layout.get("modules")
        if not (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1):
            raise bad(f"groups[{key!r}].num_layers", layers, "a whole number >= 1")
        if not (isinstance(slots, list) and all(isinstance(m, list) and len(m) == 2 and isinstance(m[0], str)
                                                and _int_list(m[1:]) for m in slots)):
            raise bad(f"groups[{key!r}].modules", slots, "a list of [module name, position]")


def _read_meta(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(f"adapter path {folder} is a file; give the folder that holds {CONFIG_NAME} "
                                     f"and {WEIGHTS_NAME}")
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} is missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    try:
        meta = json.loads((folder / CONFIG_NAME).read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{folder / CONFIG_NAME} is not valid JSON (truncated or corrupted?): {exc}") from exc
    if not isinstance(meta, dict):
        raise AdapterLoadError(f"{folder / CONFIG_NAME} holds a JSON {_type_name(meta)}, expected an object with "
                               f"{', '.join(_REQUIRED_KEYS)}; it was not written by lily-ssm")
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise AdapterLoadError(f"{folder / CONFIG_NAME} lacks {', '.join(missing)}; it was not written by lily-ssm")
    if meta["format_version"] != FORMAT_VERSION or isinstance(meta["format_version"], bool):
        raise AdapterLoadError(f"{folder / CONFIG_NAME} has format_version {meta['format_version']!r}; "
                               f"this lily-ssm reads version {FORMAT_VERSION}")
    _check_shape(meta, folder / CONFIG_NAME)
    return meta


def _parse_config(folder: Path, meta: dict[str, Any]) -> AdapterConfig:
    try:
        return config_from_dict(meta["config"])
    except (ValueError, TypeError) as exc:
        raise AdapterLoadError(f"{folder / CONFIG_NAME}: config: {exc}") from exc


def differences(expected: dict[str, Any], actual: dict[str, Any], what: str) -> list[str]:
    """``<what> key: adapter has X, model has Y`` for each key whose values differ."""
    return [f"{what} {key}: adapter has {expected.get(key)!r}, model has {actual.get(key)!r}"
            for key in sorted(set(expected) | set(actual)) if expected.get(key) != actual.get(key)]


def _read_tensors(folder: Path, meta: dict[str, Any],
                  allow_non_finite: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The verified tensors and their content hash."""
    path = folder / WEIGHTS_NAME
    payload = path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != meta["weights_sha256"]:
        raise AdapterLoadError(
            f"{path} does not match the checksum in {CONFIG_NAME}: the file is truncated, corrupted, or from "
            "another save"
        )
    try:
        tensors = load_safetensors(payload)
    except Exception as exc:  # safetensors raises its own error types on malformed files
        raise AdapterLoadError(f"{path} is not a readable safetensors file: {exc}") from exc
    expected = {k: v["shape"] for k, v in meta["tensors"].items()}
    actual = {k: list(v.shape) for k, v in tensors.items()}
    if expected != actual:
        raise AdapterLoadError(f"{path} holds tensors {actual}, {CONFIG_NAME} lists {expected}")
    for key in sorted(tensors):
        tensor, recorded = tensors[key], meta["tensors"][key].get("dtype")
        if recorded is not None and recorded != dtype_name(tensor):
            raise AdapterLoadError(f"adapter tensor {key} in {path} is {dtype_name(tensor)}, but {CONFIG_NAME} "
                                   f"records {recorded}")
        check_adapter_tensor(key, tensor, path, allow_non_finite)
    content = adapter_content_sha256(tensors)
    if meta.get("content_sha256", content) != content:
        raise AdapterLoadError(f"{path}: the tensors' content hash {content[:12]}... differs from content_sha256 "
                               f"{meta['content_sha256'][:12]}... in {CONFIG_NAME}: the files are from different saves")
    return tensors, content


def read_adapter(path: str | os.PathLike, *, revision: str | None = None,
                 allow_non_finite: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An adapter folder's metadata and tensors, without a model: the metadata's shape and config, the
    checksum, and each tensor's shape, dtype and (unless ``allow_non_finite``) finiteness are verified.
    ``path`` may be a Hub id (``org/name``, at ``revision``)."""
    folder = resolve_adapter(path, revision)
    if peft.is_peft_folder(folder):
        raise AdapterLoadError(f"{folder} is a PEFT adapter folder: load_adapter reads it, and lily-ssm convert "
                               f"--from-peft {folder} OUT writes it in lily-ssm's format")
    meta = _read_meta(folder)
    _parse_config(folder, meta)
    return meta, _read_tensors(folder, meta, allow_non_finite)[0]


def check_adapter_folder(path: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of ``path`` (a folder or Hub id); fails now, before a base model loads, if it is not
    a readable adapter folder of either format."""
    folder = resolve_adapter(path, revision)
    if peft.is_peft_folder(folder):
        peft.read_peft_folder(folder)
    else:
        read_adapter(folder)
    return folder


def load_adapter(model: nn.Module, path: str | os.PathLike, *, revision: str | None = None,
                 allow_non_finite: bool = False) -> nn.Module:
    """Load the adapter in folder ``path`` onto ``model`` (a base model, or one already adapted with
    the same config) and return it. Nothing is changed if the adapter does not fit the model, holds
    NaN or infinite values (unless ``allow_non_finite``), or was already merged into ``model``.

    A PEFT adapter folder (LoRA or Lily) loads too, with PEFT's semantics (see :mod:`.peft`), and
    ``path`` may be a Hugging Face Hub id (``org/name``, at ``revision``: a branch, tag or commit).
    """
    folder = resolve_adapter(path, revision)
    if peft.is_peft_folder(folder):
        config, raw = peft.read_peft_folder(folder, allow_non_finite)
        adapter = peft.peft_to_lily(model, config, raw, where=folder)
        _check_existing(model, adapter.config)
        return _install(model, folder, adapter.config, adapter.tensors, adapter_content_sha256(adapter.tensors))

    meta = _read_meta(folder)
    config = _parse_config(folder, meta)
    _check_existing(model, config)
    made_for, actual = meta["base_model"], describe_base_model(model)
    problems = differences({"architecture": made_for.get("architecture")}, {"architecture": actual["architecture"]},
                        "base model")
    problems += differences(made_for.get("dimensions", {}), actual["dimensions"], "config")
    shapes: dict[str, list[int]] = {}
    if not problems:
        try:
            modules, shapes = _planned_layout(model, config)
        except ValueError as exc:
            problems.append(str(exc))
        else:
            problems += differences(meta["modules"], modules, "module")
    if problems:
        raise AdapterLoadError(
            f"adapter {folder} was made for a different base model ({made_for.get('architecture')}): "
            + "; ".join(problems[:8])
        )

    tensors, content = _read_tensors(folder, meta, allow_non_finite)
    stored = {key: list(t.shape) for key, t in tensors.items()}
    if stored != shapes:
        raise AdapterLoadError(
            f"the config in {folder / CONFIG_NAME} implies adapter tensors {shapes}, but {WEIGHTS_NAME} holds {stored}"
        )
    return _install(model, folder, config, tensors, content)


def _check_existing(model: nn.Module, config: AdapterConfig) -> None:
    existing = getattr(model, ADAPTER_ATTR, None)
    if existing is not None and existing.config.to_dict() != config.resolve(model).to_dict():
        raise AdapterLoadError(f"model already carries a different adapter ({existing.config.to_dict()}); "
                               "load onto the base model instead")


def _install(model: nn.Module, folder: Path, config: AdapterConfig, tensors: dict[str, torch.Tensor],
             content: str) -> nn.Module:
    """Apply ``config`` (unless the model has it already) and copy the verified ``tensors`` in."""
    if content in merged_adapters(model):
        raise AdapterLoadError(f"adapter {folder}: its weights were already merged into this model (its config records "
                               "lily_ssm_merged); loading it again would apply it twice. Load it onto the unmerged "
                               "base model instead")
    if getattr(model, ADAPTER_ATTR, None) is None:
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

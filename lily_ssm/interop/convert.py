"""Converting adapter folders between PEFT's format and lily-ssm's, on the base model's architecture alone."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config.record import read_record
from ..models.loading import build_meta_model
from ..persistence import SAVE_FORMATS, AdapterLoadError, peft, read_adapter
from ..persistence.hub import resolve_adapter
from ..persistence.native import differences, write_adapter
from ..tuners import config_from_dict
from ..tuners.model import SAVED_PREFIX, describe_base_model, modules_shapes, plan_pools, pool_tensors
from ..tuners.routing import RoutingContext


def convert_adapter(source: str | os.PathLike, destination: str | os.PathLike, to: str,
                    model: str | None = None) -> Path:
    """Rewrite an adapter folder in the other format without loading the base model's weights (its
    architecture is built on the meta device): ``to="lily"`` reads a PEFT folder, ``to="peft"`` one of
    lily-ssm's. ``model`` names the base model (hub id or folder); by default the one the PEFT config
    or the adapter's experiment record names."""
    if to not in SAVE_FORMATS:
        raise ValueError(f"to={to!r}; choose one of {', '.join(SAVE_FORMATS)}")
    source = resolve_adapter(source)
    is_peft = peft.is_peft_folder(source)
    if is_peft != (to == "lily"):
        kind = "a PEFT" if is_peft else "a lily-ssm"
        raise AdapterLoadError(f"{source} is {kind} adapter folder; convert it with "
                               f"{'--from-peft' if is_peft else '--to-peft'}")
    if to == "lily":
        config, raw = peft.read_peft_folder(source)
        base = _base_model_name(model, config.get("base_model_name_or_path"), source)
        meta_model = build_meta_model(base)
        adapter = peft.peft_to_lily(meta_model, config, raw, where=source)
        return write_adapter(destination, adapter, describe_base_model(meta_model))
    meta, tensors = read_adapter(source)
    config = config_from_dict(meta["config"])
    record = read_record(source)
    base = _base_model_name(model, record.base_model if record else None, source)
    meta_model = build_meta_model(base)
    made_for, actual = meta["base_model"], describe_base_model(meta_model)
    problems = differences(made_for.get("dimensions", {}), actual["dimensions"], "config")
    if made_for.get("architecture") != actual["architecture"] or problems:
        raise AdapterLoadError(f"adapter {source} was made for {made_for.get('architecture')}, not {base} "
                               f"({actual['architecture']}): " + "; ".join(problems[:4]))
    groups, pools = plan_pools(meta_model, config, RoutingContext(), device=torch.device("meta"))
    planned = {key: list(p.shape) for key, p in pool_tensors(pools).items()}
    stored = {key: list(t.shape) for key, t in tensors.items() if not key.startswith(SAVED_PREFIX)}
    if modules_shapes(groups) != meta["modules"] or planned != stored:
        raise AdapterLoadError(f"adapter {source} does not fit {base}: its modules or tensor shapes differ from the "
                               "ones its config gives on that model")
    return peft.write_peft_folder(destination, *peft.lily_to_peft(meta_model, peft.Translated(config, groups,
                                                                                               tensors)))


def _base_model_name(given: str | None, recorded: str | None, source: Path) -> str:
    if given:
        return given
    if isinstance(recorded, str) and recorded:
        return recorded
    raise ValueError(f"{source} does not record its base model; name it with --model (a hub id or local folder)")

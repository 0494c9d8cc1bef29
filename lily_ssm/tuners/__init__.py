"""Adapter methods (one folder each) on shared injection machinery."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from .base import AdaptedLinear, AdapterConfig
from .lily import LilyConfig
from .lora import LoraConfig
from .model import apply_adapter, get_adapter_state, merge_adapter

CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {"lily": LilyConfig, "lora": LoraConfig}


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from :meth:`AdapterConfig.to_dict` output, with clear errors on bad input."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in CONFIG_CLASSES:
        raise ValueError(f"adapter method {method!r}; known methods: {', '.join(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[method]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {method} config field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))} "
                         "(lily-ssm config lists them with their meaning)")
    try:
        config = cls(**data)
    except TypeError as exc:
        raise ValueError(f"incomplete {method} config: {exc}") from exc
    config.validate()
    return config


__all__ = [
    "AdaptedLinear", "AdapterConfig", "CONFIG_CLASSES", "LilyConfig", "LoraConfig", "apply_adapter",
    "config_from_dict", "get_adapter_state", "merge_adapter",
]

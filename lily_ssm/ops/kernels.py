"""Lazy access to the optional CUDA kernels (``mamba-ssm``, ``causal-conv1d``).

Neither package imports without CUDA, so nothing here imports them until a CUDA tensor asks.
Tests substitute reference functions with :func:`override` to exercise the kernel wiring on CPU.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

_KERNEL_FUNCTIONS = {
    "selective_scan_fn": "mamba_ssm.ops.selective_scan_interface",
    "mamba_chunk_scan_combined": "mamba_ssm.ops.triton.ssd_combined",
    "selective_state_update": "mamba_ssm.ops.triton.selective_state_update",
    "causal_conv1d_fn": "causal_conv1d",
    "causal_conv1d_update": "causal_conv1d",
}
_loaded: dict[str, Any] = {}
_override: SimpleNamespace | None = None
_override_devices: frozenset[str] = frozenset()


def get(name: str) -> Any | None:
    """The kernel function ``name``, or None when its package is not importable."""
    if _override is not None:
        return getattr(_override, name, None)
    if name not in _loaded:
        try:
            _loaded[name] = getattr(importlib.import_module(_KERNEL_FUNCTIONS[name]), name)
        except Exception:  # ImportError, or a CUDA/ABI error raised while the extension loads
            _loaded[name] = None
    return _loaded[name]


def usable(name: str, tensor: torch.Tensor) -> Any | None:
    """The kernel ``name`` if it exists and ``tensor`` lives where it can run, else None."""
    allowed = _override_devices if _override is not None else frozenset({"cuda"})
    if tensor.device.type not in allowed:
        return None
    return get(name)


@contextlib.contextmanager
def override(devices: tuple[str, ...] = ("cpu",), **functions: Any) -> Iterator[None]:
    """Use ``functions`` as the kernels, on tensors of ``devices``, inside the ``with`` block."""
    global _override, _override_devices
    saved = _override, _override_devices
    _override, _override_devices = SimpleNamespace(**functions), frozenset(devices)
    try:
        yield
    finally:
        _override, _override_devices = saved

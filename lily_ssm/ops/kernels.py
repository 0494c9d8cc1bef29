"""Lazy access to the optional CUDA kernels (``mamba-ssm``, ``causal-conv1d``) (docs/design.md §8).

Neither package imports without CUDA, so nothing here imports them until a CUDA tensor asks.
Tests substitute reference functions with :func:`override` to exercise the kernel wiring on CPU.
The first dispatch on each device type logs one line (logger ``lily_ssm``, INFO) saying which scan and
convolution run there and why (:func:`describe_path`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

# kernel name -> (module, attribute); attribute None: the module itself (a compiled extension)
KERNELS: dict[str, tuple[str, str | None]] = {
    "selective_scan_fn": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "selective_scan_cuda": ("selective_scan_cuda", None),  # its fwd / bwd, for the fused core's own backward
    "mamba_chunk_scan_combined": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
    "causal_conv1d_fn": ("causal_conv1d", "causal_conv1d_fn"),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d_update"),
}
_PACKAGES = {"mamba_ssm": "mamba-ssm", "selective_scan_cuda": "mamba-ssm", "causal_conv1d": "causal-conv1d"}
_loaded: dict[str, Any] = {}
_announced: set[str] = set()  # device types whose path has been logged
logger = logging.getLogger("lily_ssm")
_override: SimpleNamespace | None = None
_override_devices: frozenset[str] = frozenset()


def get(name: str) -> Any | None:
    """The kernel function ``name``, or None when its package is not importable."""
    if _override is not None:
        return getattr(_override, name, None)
    if name not in _loaded:
        module, attribute = KERNELS[name]
        try:
            found = importlib.import_module(module)
            _loaded[name] = found if attribute is None else getattr(found, attribute)
        except Exception:  # ImportError, or a CUDA/ABI error raised while the extension loads
            _loaded[name] = None
    return _loaded[name]


def import_error(name: str) -> str | None:
    """Why kernel ``name`` does not import (one line), or None when it does."""
    module, attribute = KERNELS[name]
    try:
        found = importlib.import_module(module)
        if attribute is not None:
            getattr(found, attribute)
    except Exception as exc:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200]
    return None


def usable(name: str, tensor: torch.Tensor) -> Any | None:
    """The kernel ``name`` if it exists and ``tensor`` lives where it can run, else None."""
    device = tensor.device.type
    if device not in _announced and _override is None and device != "meta":
        _announced.add(device)
        logger.info(describe_path(device))
    allowed = _override_devices if _override is not None else frozenset({"cuda"})
    if device not in allowed:
        return None
    return get(name)


def describe_path(device_type: str) -> str:
    """One line: which SSM scan and convolution run on tensors of ``device_type``, and why."""
    if device_type != "cuda":
        return (f"SSM path on {device_type}: lily-ssm's PyTorch scans and convolution (the mamba-ssm and "
                "causal-conv1d kernels run on CUDA tensors only)")
    missing = [name for name in KERNELS if get(name) is None]
    if not missing:
        return "SSM path on cuda: the mamba-ssm scan kernels and causal-conv1d"
    packages = sorted({_PACKAGES[KERNELS[name][0].split(".")[0]] for name in missing})
    kernels_too = "" if len(missing) == len(KERNELS) else "; the other kernels run"
    return (f"SSM path on cuda: lily-ssm's PyTorch code for {', '.join(missing)} ({' and '.join(packages)} not "
            f"importable: pip install 'lily-ssm[cuda]'){kernels_too}")


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

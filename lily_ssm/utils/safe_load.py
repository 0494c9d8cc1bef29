"""Reading tensor files safely: PyTorch ``.pth`` / ``.pt`` files with ``weights_only=True``, and the
checks every loaded adapter tensor passes; errors are one line."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch


class TensorFileError(ValueError):
    """A file that should hold tensors but cannot be read as a weights-only PyTorch file."""


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be loaded onto the given model."""


def dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def check_adapter_tensor(key: str, tensor: torch.Tensor, where: str | os.PathLike,
                         allow_non_finite: bool = False) -> None:
    """Refuse an adapter tensor that is not floating point, or holds NaN / infinite values (unless
    ``allow_non_finite``); ``where`` names the file it came from."""
    if not tensor.is_floating_point():
        raise AdapterLoadError(f"adapter tensor {key} in {where} is {dtype_name(tensor)}; adapter weights must be a "
                               "floating-point dtype (float32, bfloat16, float16, float64)")
    if allow_non_finite:
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        nan = int(torch.isnan(tensor).sum())
        raise AdapterLoadError(
            f"adapter tensor {key} in {where} holds {nan} NaN and {tensor.numel() - int(finite.sum()) - nan} "
            "infinite values (diverged training?); refused (load_adapter(..., allow_non_finite=True) accepts them)"
        )


_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load_tensors_file(path: str | os.PathLike, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with errors that name ``what`` the file is (e.g. "Vim
    checkpoint", "optimizer state") and the file: missing, a folder, a pickle of other Python objects
    (refused, never unpickled), or truncated / not a PyTorch file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise  # permission denied and the like: the OS message names the file
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise TensorFileError(f"{what} {path} is not a readable PyTorch file (truncated or corrupted?): "
                                  f"{_first_line(exc)}") from exc
        found = _UNSUPPORTED.search(str(exc))
        detail = f" ({found.group(1)})" if found else ""
        raise TensorFileError(
            f"{what} {path} is not a weights file: it holds Python objects other than tensors{detail}, so it was "
            "refused (only weights_only pickles load; a truncated file can look like this too)"
        ) from exc
    except Exception as exc:  # torch.load raises many types on damaged files: EOFError, KeyError, RuntimeError, ...
        if type(exc).__name__ == "OutOfMemoryError":
            raise
        raise TensorFileError(f"{what} {path} is not a readable PyTorch file (truncated or corrupted?): "
                              f"{type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0] if text else "no details"

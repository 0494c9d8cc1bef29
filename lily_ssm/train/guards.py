"""Stopping a training run at the first non-finite value, in both training loops."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class TrainingDivergedError(ValueError):
    """A non-finite loss, gradient or adapter weight: training stopped, no final adapter was written."""


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every given tensor holds only finite values (one device sync for all of them)."""
    checks = [t.isfinite().all() for t in tensors if t is not None]
    return bool(torch.stack(checks).all()) if checks else True


def diverged(step: int, what: str) -> TrainingDivergedError:
    return TrainingDivergedError(f"training stopped at step {step}: {what}; no final adapter was written. Lower the "
                                 "learning rate (or check the data); the last checkpoint, if any, holds finite weights")

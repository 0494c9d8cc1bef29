"""Sequence-mixing operators: CUDA kernels when available, PyTorch references beside them (docs/design.md §8)."""

from .conv import causal_conv1d, causal_conv1d_update
from .scan import (
    selective_scan,
    selective_scan_backward,
    selective_scan_forward,
    selective_scan_ref,
    selective_state_update,
)
from .scan_chunked import selective_scan_chunked

__all__ = [
    "causal_conv1d", "causal_conv1d_update", "selective_scan", "selective_scan_backward", "selective_scan_chunked",
    "selective_scan_forward", "selective_scan_ref", "selective_state_update",
]

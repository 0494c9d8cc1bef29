"""Padding in a mixer's input: padded positions must neither feed the recurrent state nor the routers."""

from __future__ import annotations

import torch


def mask_padding(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded positions of ``(batch, seqlen, dim)``; unchanged without a mask of that length."""
    if attention_mask is None or attention_mask.shape[1] != hidden.shape[1]:
        return hidden
    return (hidden * attention_mask[:, :, None]).to(hidden.dtype)

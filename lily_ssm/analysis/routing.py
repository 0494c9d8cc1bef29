"""Router weights accumulated over data: which B experts each layer mixes (paper Fig. 4)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..tuners.model import get_adapter_state


class RouterRecorder:
    """Sums of expert weights per adapted module, over samples (sequence/batch) or valid tokens.

    With ``per_sample=True`` it also keeps each sample's mean mix per slot: :attr:`samples` maps a slot
    key to an ``(S, num_B)`` tensor, one row per sample per forward call, in call order. A sample's row
    is its ``(N, E)`` row for sequence routing, the mean over its valid tokens of ``(N, T, E)`` causal /
    token weights (the mix of its token-averaged update), and the ``(E,)`` batch mix repeated for
    every sample of the batch (the batch size is read from the attention mask or, without one, from
    :attr:`batch_size`, which the caller sets before each forward call).
    """

    def __init__(self, per_sample: bool = False) -> None:
        self.totals: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.per_sample = per_sample
        self.batch_size: int | None = None  # samples in the current call, for batch routing without a mask
        self._rows: dict[str, list[torch.Tensor]] = {}

    def add(self, key: str, weights: torch.Tensor, mask: torch.Tensor | None) -> None:
        w = weights.detach().float()
        if w.dim() == 3 and mask is not None:  # per-token weights: padding does not count
            keep = mask.to(w.device).float()[..., None]
            total, count = (w * keep).sum((0, 1)), keep.sum().item()
        else:
            rows = w.reshape(-1, w.shape[-1])
            total, count = rows.sum(0), rows.shape[0]
        self.totals[key] = self.totals.get(key, 0) + total.cpu()
        self.counts[key] = self.counts.get(key, 0) + count
        if self.per_sample:
            self._rows.setdefault(key, []).append(self._sample_rows(w, mask).cpu())

    def _sample_rows(self, w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if w.dim() == 1:
            n = mask.shape[0] if mask is not None else (self.batch_size or 1)
            return w[None].expand(n, -1)
        if w.dim() == 2:
            return w
        if mask is None:
            return w.mean(1)
        keep = mask.to(w.device).float()[..., None]
        return (w * keep).sum(1) / keep.sum(1).clamp_min(1.0)

    @property
    def samples(self) -> dict[str, torch.Tensor]:
        """Per slot key, the samples' mean mixes ``(S, num_B)`` (empty unless ``per_sample=True``)."""
        return {key: torch.cat(rows) for key, rows in self._rows.items()}

    def means(self) -> dict[str, torch.Tensor]:
        return {key: self.totals[key] / max(self.counts[key], 1e-9) for key in self.totals}


@contextlib.contextmanager
def record_router_weights(model: nn.Module, per_sample: bool = False) -> Iterator[RouterRecorder]:
    """Inside the block, every Lily layer with routers adds its expert weights to the recorder
    (with ``per_sample=True`` also each sample's mean mix, see :class:`RouterRecorder`)."""
    context = get_adapter_state(model).context
    recorder = RouterRecorder(per_sample=per_sample)
    previous, context.recorder = context.recorder, recorder
    try:
        yield recorder
    finally:
        context.recorder = previous


def router_matrix(model: nn.Module, recorder: RouterRecorder) -> dict[str, torch.Tensor]:
    """Per target type, a ``(layers, num_B)`` matrix of mean router weights in layer order."""
    state = get_adapter_state(model)
    means = recorder.means()
    matrices = {}
    for key, group in state.groups.items():
        rows = [means[m.key] for m in group.modules if m.key in means]
        if rows:
            matrices[key] = torch.stack(rows)
    return matrices

"""Router weights accumulated over data: which B experts each layer mixes (paper Fig. 4)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..tuners.model import get_adapter_state
from ..utils.atomic import atomic_path


class RouterRecorder:
    """Sums of expert weights per adapted module, over samples (sequence/batch) or valid tokens."""

    def __init__(self) -> None:
        self.totals: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}

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

    def means(self) -> dict[str, torch.Tensor]:
        return {key: self.totals[key] / max(self.counts[key], 1e-9) for key in self.totals}


@contextlib.contextmanager
def record_router_weights(model: nn.Module) -> Iterator[RouterRecorder]:
    """Inside the block, every Lily layer with routers adds its expert weights to the recorder."""
    context = get_adapter_state(model).context
    recorder = RouterRecorder()
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


def plot_router_weights(matrices: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """A heatmap per target type (layers x B experts), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not matrices:
        raise ValueError("no router weights were recorded: the adapter has no routers (num_B=1) or saw no data")
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices) + 1, 4), squeeze=False)
    for ax, (key, matrix) in zip(axes[0], matrices.items()):
        image = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_title(key)
        ax.set_xlabel("B expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(matrix.shape[0]))
        fig.colorbar(image, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path

"""The figures of ``lily-ssm inspect`` (and the quickstart's router plot), written as PNG files."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import torch

from ..utils.atomic import atomic_path
from .adapters import SavedAdapter, b_usage
from .rank import threshold_text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    return path


def _rank_caption(adapters: list[SavedAdapter], ranks: dict[str, dict[str, list[dict[str, Any]]]],
                  data: str | None, columns: int = 200) -> str:
    mixes = {row["mix"] for per_type in ranks.values() for rows in per_type.values() for row in rows}
    lines = []
    if "per-sample" in mixes:
        samples = max(a.samples or 0 for a in adapters)
        lines.append(f"Lily: ΔW = s·A_g·Σ_i w_i B_i per sample, w = the sample's mean router mix ({samples} samples of "
                     f"{data}; exact for sequence routing, the token-averaged update for causal/token routing); "
                     "line = median, band = min–max.")
    if "uniform" in mixes:
        lines.append("Lily without data (dashed): uniform B mix w_i = 1/num_B.")
    if "lora" in mixes:
        lines.append("LoRA: ΔW = (α/r)·A·B per layer.")
    return "\n".join(textwrap.fill(line, columns) for line in lines)


def plot_effective_ranks(adapters: list[SavedAdapter], ranks: dict[str, dict[str, list[dict[str, Any]]]],
                         path: str | Path, rtol: float, data: str | None = None) -> Path:
    """One panel per target type (union over adapters), x = layer position, y = effective rank of ΔW."""
    plt = _pyplot()
    keys = list(dict.fromkeys(key for a in adapters for key in a.types))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys) + 0.6, 4.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        top = 1
        for index, adapter in enumerate(adapters):  # one colour per adapter across panels
            rows = ranks[adapter.name].get(key)
            if not rows:
                continue
            t = adapter.types[key]
            x = [row["position"] for row in rows]
            uniform = rows[0]["mix"] == "uniform"
            (line,) = ax.plot(x, [row["median"] for row in rows], marker="o", markersize=3, color=f"C{index % 10}",
                              linestyle="--" if uniform else "-",
                              label=adapter.label(t) + (", uniform B mix" if uniform else ""))
            if rows[0]["mix"] == "per-sample":
                ax.fill_between(x, [row["min"] for row in rows], [row["max"] for row in rows],
                                color=line.get_color(), alpha=0.2, linewidth=0)
            top = max(top, t.r, *(row["max"] for row in rows))
        ax.set_title(key)
        ax.set_xlabel("layer position")
        ax.set_ylabel("effective rank of ΔW")
        ax.set_ylim(0, top * 1.1 + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    fig.suptitle(f"Effective rank of ΔW per layer ({threshold_text(rtol)})")
    width, height = fig.get_size_inches()
    caption = _rank_caption(adapters, ranks, data, columns=int(width * 17))
    fig.text(0.01, 0.01, caption, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, (caption.count("\n") + 1) * 0.13 / height + 0.03, 1, 1))
    return _save(fig, Path(path))


def plot_structure(adapter: SavedAdapter, path: str | Path) -> Path:
    """Per target type of a Lily adapter: the A expert of each layer (one-hot), and B expert usage."""
    plt = _pyplot()
    types = list(adapter.types.values())
    fig, axes = plt.subplots(2, len(types), figsize=(3.8 * len(types) + 0.6, 7.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    for column, t in enumerate(types):
        num_a = t.A.shape[0]
        onehot = torch.zeros(len(t.slots), num_a)
        for row, (_, position) in enumerate(t.slots):
            onehot[row, t.a_group(position)] = 1.0
        ax = axes[0][column]
        ax.imshow(onehot.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{t.key}: A expert per layer (num_A={num_a})", fontsize=9)
        ax.set_xlabel("A expert")
        ax.set_ylabel("layer position")
        ax.set_xticks(range(num_a))
        ax.yaxis.get_major_locator().set_params(integer=True)
        usage = b_usage(adapter, t)
        ax = axes[1][column]
        ax.bar(range(len(usage["values"])), usage["values"], color="tab:orange")
        ax.set_title(f"{t.key}: B experts (num_B={t.B.shape[0]})", fontsize=9)
        ax.set_xlabel("B expert")
        ax.set_ylabel(usage["kind"], fontsize=8)
        ax.set_xticks(range(len(usage["values"])))
        ax.set_xlim(-0.8, max(len(usage["values"]), 2) - 0.2)
    fig.suptitle(f"{adapter.name}: Lily sharing structure")
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_router_weights(matrices: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """A heatmap per target type (layers x B experts), written as a PNG."""
    plt = _pyplot()
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
    return _save(fig, Path(path))

"""VTAB-1K scoring: a backbone's test accuracy, and the per-task and group-mean table of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.vtab import group_means
from ..models.backbones import logits_of
from ..utils.atomic import write_atomic


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """The fraction of ``loader``'s images whose top class is their label."""
    model.eval()
    correct = total = 0
    for pixels, labels in loader:
        correct += (logits_of(model(pixels)).argmax(-1) == labels).sum().item()
        total += labels.numel()
    return correct / max(total, 1)


def summarize(results: dict[str, dict[str, Any]], output_dir: str | Path) -> str:
    """Per-task and group-mean table (final-epoch accuracy; best-seen as a labelled extra column), written as
    ``results.md`` and ``results.json`` into ``output_dir``."""
    final = {task: 100 * r["test_accuracy"] for task, r in results.items()}
    best = {task: 100 * r["best_test_accuracy_seen"] for task, r in results.items()}
    lines = ["| task | group | test acc. (final epoch) | best test acc. seen (selection on test) |",
             "|---|---|---:|---:|"]
    lines += [f"| {task} | {results[task]['group']} | {final[task]:.1f} | {best[task]:.1f} |" for task in results]
    means_final, means_best = group_means(final), group_means(best)
    lines += [f"| **{name}** | | **{value:.1f}** | {means_best[name]:.1f} |" for name, value in means_final.items()]
    table = "\n".join(lines) + "\n"
    out = Path(output_dir)
    write_atomic(out / "results.md", table)
    write_atomic(out / "results.json", json.dumps({"tasks": results, "means_final": means_final,
                                                   "means_best_seen": means_best}, indent=1) + "\n")
    return table

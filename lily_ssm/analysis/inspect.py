"""``lily-ssm inspect``: what saved adapters learned, as PNG figures and the numbers behind them.

- ``effective_rank.png``: the effective rank of ΔW per layer (paper Fig. 3), every adapter overlaid.
  LoRA: ``ΔW = (alpha/r)·A·B`` per layer. Lily: ``ΔW = s·A_g·(Σ_i w_i B_i)`` per sample, from that
  sample's mean router mix ``w`` over a data set (exact for ``sequence`` routing; for ``causal`` /
  ``token`` routing it is the token-averaged update), or from the uniform mix without data.
- ``router_weights.png``: mean router weights per layer and B expert over the data (paper Fig. 4).
- ``structure.png`` (Lily): the A expert each layer uses, and how much each B expert is used.
- ``inspect.json``: the numbers behind the figures.

Without data nothing but the adapter folder is read: no base model is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.loading import check_model_source
from ..persistence.hub import resolve_adapter
from ..utils.atomic import write_atomic
from .adapters import adapter_ranks, b_usage, read_saved_adapter
from .figures import plot_effective_ranks, plot_router_weights, plot_structure
from .rank import DEFAULT_RTOL, threshold_text
from .recording import DATA_HELP, check_recording_inputs, record_mixes


def _names(folders: list[Path]) -> list[str]:
    """Short distinct labels: the folder name, or ``parent-name`` where folder names repeat (e.g. the
    ``<arm>/adapter`` folders of an ablation), numbered only if those repeat too."""
    paths = [folder.resolve() for folder in folders]
    leaf = [p.name or "adapter" for p in paths]
    names = [n if leaf.count(n) == 1 else f"{p.parent.name}-{n}" for p, n in zip(paths, leaf)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def inspect_adapters(adapter_dirs: list[str | Path], out_dir: str | Path, data: str | None = None,
                     model: str | None = None, limit: int = 64, batch_size: int = 8, rtol: float = DEFAULT_RTOL,
                     log: Callable[[str], Any] = print, dtype: str | None = None,
                     device: str | None = None) -> dict[str, Any]:
    """Write ``effective_rank.png``, ``structure.png`` (Lily), ``router_weights.png`` (Lily with data)
    and ``inspect.json`` for the adapter folders into ``out_dir``; returns what ``inspect.json`` holds.

    Ranks count singular values ``σ > rtol·σ_max``. ``data`` (used for Lily adapters with routers only;
    LoRA's ΔW does not depend on the input) is a commonsense JSON/JSONL file, a test-set root with
    ``<task>/test.json``, ``builtin:synthetic-commonsense``, or for a VTAB task folder the VTAB-1K root;
    its first ``limit`` items are run in batches of ``batch_size``. The language model is ``model`` or
    the one in the adapter folder's ``experiment.yaml``; a VTAB task folder's backbone (Vim or ViT) is
    rebuilt from its ``result.json``. With several adapters, per-adapter figures are prefixed with the folder name.
    """
    given = [str(d) for d in adapter_dirs]
    if model is not None and data is not None:
        check_model_source(model)  # a Hub id offline fails now, in seconds
    folders = [resolve_adapter(d) for d in adapter_dirs]  # a Hub id (org/name) becomes its local snapshot
    if not folders:
        raise ValueError("no adapter folders given")
    if limit < 1 or batch_size < 1:
        raise ValueError(f"limit={limit}, batch_size={batch_size}; both must be at least 1")
    if not rtol >= 0:
        raise ValueError(f"rtol={rtol!r}; must be a number >= 0 (relative to the largest singular value)")
    if data is not None and not str(data).startswith("builtin:") and not Path(data).exists():
        raise FileNotFoundError(f"--data {data} does not exist; give {DATA_HELP}")
    labels = _names([Path(g) if Path(g).exists() else Path(g.replace("/", "--")) for g in given])
    adapters = [read_saved_adapter(folder, name) for folder, name in zip(folders, labels)]
    if data is not None:  # every adapter's inputs, before the first model loads
        check_recording_inputs(adapters, str(data), model)
    out = Path(out_dir)
    prefix = len(adapters) > 1
    summary: dict[str, Any] = {"rtol": rtol, "threshold": threshold_text(rtol), "data": data, "limit": limit,
                               "adapters": {}, "figures": []}
    ranks: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for adapter in adapters:
        shapes = ", ".join(f"{k} r={t.r}" + (f" A={t.A.shape[0]} B={t.B.shape[0]}" if adapter.method == "lily" else "")
                           for k, t in adapter.types.items())
        log(f"inspect: {adapter.folder} ({adapter.method}; {shapes})")
        if data is not None and adapter.method == "lily" and adapter.has_routers:
            record_mixes(adapter, str(data), model, limit, batch_size, dtype, device, log)
        elif data is not None:
            log(f"  {adapter.name}: ΔW does not depend on the input (" +
                ("LoRA" if adapter.method == "lora" else "Lily with a single B expert") + "); --data is not used")
        ranks[adapter.name] = adapter_ranks(adapter, rtol)
        head = f"{adapter.name}_" if prefix else ""
        figures = []
        if adapter.router_matrices:
            source = "/".join(Path(str(data)).parts[-2:]) or data
            title = f"{adapter.name}: mean router weights\n({adapter.samples} samples of {source})"
            figures.append(plot_router_weights(adapter.router_matrices, out / f"{head}router_weights.png", title))
        if adapter.method == "lily":
            figures.append(plot_structure(adapter, out / f"{head}structure.png"))
        summary["figures"] += [str(f) for f in figures]
        summary["adapters"][adapter.name] = {
            "folder": str(adapter.folder), "method": adapter.method, "samples": adapter.samples,
            "targets": {
                key: {"r": t.r, "num_layers": t.num_layers, "scaling": adapter.scaling(t),
                      **({"num_A": t.A.shape[0], "num_B": t.B.shape[0], "b_usage": b_usage(adapter, t),
                          "router_weights": adapter.router_matrices[key].tolist()
                          if key in adapter.router_matrices else None} if adapter.method == "lily" else {}),
                      "layers": ranks[adapter.name][key]}
                for key, t in adapter.types.items()
            },
        }
    rank_path = plot_effective_ranks(adapters, ranks, out / "effective_rank.png", rtol, data)
    summary["figures"].insert(0, str(rank_path))
    write_atomic(out / "inspect.json", json.dumps(summary, indent=1) + "\n")
    log(f"figures written to {out}/: {', '.join(Path(f).name for f in summary['figures'])} (numbers: inspect.json)")
    return summary

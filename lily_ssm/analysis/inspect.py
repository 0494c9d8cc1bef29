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

import itertools
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..interop.hub import resolve_adapter
from ..persistence import CONFIG_NAME, read_adapter
from ..train.config import EXPERIMENT_NAME
from ..tuners import config_from_dict
from ..tuners.targets import a_group
from ..utils.atomic import atomic_path, write_atomic
from .rank import DEFAULT_RTOL, lily_sample_ranks, lora_layer_ranks, threshold_text
from .routing import plot_router_weights, record_router_weights, router_matrix

RESULT_NAME = "result.json"  # written by `lily-ssm vtab` beside each task's adapter
DATA_HELP = ("a commonsense JSON/JSONL file, a test-set root with <task>/test.json, builtin:synthetic-commonsense, "
             "or, for a VTAB task folder, the VTAB-1K root")


@dataclass
class TargetType:
    """One target type of a saved adapter: its slots in layer order and its tensors."""

    key: str
    num_layers: int
    slots: list[tuple[str, int]]  # (slot key, position)
    values: dict[str, Any]  # the config with this type's overrides applied
    A: torch.Tensor
    B: torch.Tensor
    router: torch.Tensor | None

    @property
    def r(self) -> int:
        return self.A.shape[-1]

    def a_group(self, position: int) -> int:
        """The A expert the layer at ``position`` uses."""
        return a_group(position, self.num_layers, self.A.shape[0], self.values.get("stride_A"))


@dataclass
class SavedAdapter:
    """An adapter folder read without its base model."""

    folder: Path
    name: str
    method: str
    meta: dict[str, Any]
    types: dict[str, TargetType]
    vtab: dict[str, Any] | None = None  # result.json of a `lily-ssm vtab` task folder
    mixes: dict[str, torch.Tensor] = field(default_factory=dict)  # slot key -> (S, num_B) from data
    router_matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int | None = None

    @property
    def has_routers(self) -> bool:
        return any(t.router is not None for t in self.types.values())

    def scaling(self, t: TargetType) -> float:
        if self.method == "lora":
            return float(t.values["alpha"]) / t.r
        return float(t.values["scaling"])

    def label(self, t: TargetType) -> str:
        return f"{self.name} ({self.method}, r={t.r})"


def read_saved_adapter(folder: str | Path, name: str | None = None) -> SavedAdapter:
    """Read an adapter folder's config, layout and tensors (checksum-verified), without a model."""
    folder = Path(folder)
    meta, tensors = read_adapter(folder)
    if "groups" not in meta:
        raise ValueError(f"{folder / CONFIG_NAME} has no 'groups' layout (saved by an older lily-ssm); load it onto "
                         "its base model with lily_ssm.load_adapter and save it again with lily_ssm.save_adapter")
    config = config_from_dict(meta["config"])
    types = {}
    for key, layout in meta["groups"].items():
        missing = [f"{key}.{kind}" for kind in ("A", "B") if f"{key}.{kind}" not in tensors]
        if missing:
            raise ValueError(f"{folder}: the layout lists target type {key!r}, the weights lack {', '.join(missing)}")
        types[key] = TargetType(key, int(layout["num_layers"]), [(s, int(p)) for s, p in layout["modules"]],
                                config.for_target(key), tensors[f"{key}.A"].float(), tensors[f"{key}.B"].float(),
                                tensors[f"{key}.router"].float() if f"{key}.router" in tensors else None)
    vtab = None
    if (folder / RESULT_NAME).is_file():
        result = json.loads((folder / RESULT_NAME).read_text())
        if isinstance(result.get("config"), dict) and "model" in result["config"]:
            vtab = result
    return SavedAdapter(folder, name or folder.resolve().name, config.method, meta, types, vtab)


# ----------------------------------------------------------------------------------------------
# Effective ranks


def adapter_ranks(adapter: SavedAdapter, rtol: float = DEFAULT_RTOL) -> dict[str, list[dict[str, Any]]]:
    """Per target type, one record per layer slot: ``position``, the rank (``median`` / ``min`` /
    ``max`` over samples), ``samples`` and ``mix`` (``per-sample``, ``uniform``, ``single B``, ``lora``);
    Lily records also hold the ``a_group``."""
    ranks: dict[str, list[dict[str, Any]]] = {}
    for key, t in adapter.types.items():
        scaling = adapter.scaling(t)
        rows = []
        if adapter.method == "lora":
            for (slot, position), rank in zip(t.slots, lora_layer_ranks(t.A, t.B, scaling, rtol).tolist()):
                rows.append({"slot": slot, "position": position, "median": rank, "min": rank, "max": rank,
                             "samples": None, "mix": "lora"})
        else:
            for slot, position in t.slots:
                group = t.a_group(position)
                weights = adapter.mixes.get(slot) if t.router is not None else None
                values = lily_sample_ranks(t.A[group], t.B, weights, scaling, rtol).double()
                mix = "single B" if t.router is None else ("per-sample" if weights is not None else "uniform")
                rows.append({"slot": slot, "position": position, "a_group": group,
                             "median": float(values.quantile(0.5)), "min": int(values.min()),
                             "max": int(values.max()), "samples": len(values) if weights is not None else None,
                             "mix": mix})
        ranks[key] = rows
    return ranks


def b_usage(adapter: SavedAdapter, t: TargetType) -> dict[str, Any]:
    """How much each B expert of ``t`` is used: the mean router weight over the data and the type's
    layers when there is one, else the experts' Frobenius norms."""
    if adapter.router_matrices.get(t.key) is not None:
        values = adapter.router_matrices[t.key].mean(0)
        return {"kind": f"mean router weight ({adapter.samples} samples)", "values": values.tolist()}
    kind = "‖B_i‖_F (no data given)" if t.router is not None else "‖B‖_F (single B expert)"
    return {"kind": kind, "values": t.B.flatten(1).norm(dim=1).tolist()}


# ----------------------------------------------------------------------------------------------
# Running data through the model


def _interleave(lists: list[list[Any]], limit: int) -> list[Any]:
    mixed = (item for group in itertools.zip_longest(*lists) for item in group if item is not None)
    return list(itertools.islice(mixed, limit))


def commonsense_prompts(data: str, limit: int, protocol: str = "paper") -> list[str]:
    """Evaluation prompts (of ``protocol``) of the first ``limit`` items of a JSON / JSONL file, or of
    the test sets ``<root>/<task>/test.json`` taken in turn."""
    from ..data.commonsense import read_rows, resolve_data_root
    from ..data.prompts import TASKS, evaluation_prompt

    path = resolve_data_root(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {data} does not exist; give {DATA_HELP}")
    if path.is_file():
        rows = read_rows(path, ("instruction",))[:limit]
    else:
        files = [path / task / "test.json" for task in TASKS if (path / task / "test.json").is_file()]
        if not files:
            raise FileNotFoundError(f"--data {data} is a folder without <task>/test.json for any of "
                                    f"{', '.join(TASKS)}; give {DATA_HELP}")
        rows = _interleave([read_rows(f, ("instruction",))[:limit] for f in files], limit)
    return [evaluation_prompt(row["instruction"], row.get("input"), protocol) for row in rows]


def _experiment_model(folder: Path) -> dict[str, Any] | None:
    """``model``, ``data.cutoff_len`` and the prompt protocol of the ``experiment.yaml`` in the folder or its
    parent (a checkpoint)."""
    from ..train.config import read_experiment_record, recorded_protocol

    found = read_experiment_record(folder)
    if found is None:
        return None
    candidate, raw = found
    model = raw.get("model") or {}
    if not (isinstance(model, dict) and model.get("name_or_path")):
        return None
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    return {"name_or_path": model["name_or_path"], "dtype": model.get("dtype", "auto"),
            "tokenizer": model.get("tokenizer"), "trust_remote_code": bool(model.get("trust_remote_code")),
            "cutoff_len": data.get("cutoff_len", 256), "protocol": recorded_protocol(raw), "source": str(candidate)}


def _language_model(adapter: SavedAdapter, model: str | None, dtype: str | None,
                    experiment: dict[str, Any] | None) -> tuple[Any, Any, int]:
    from ..models.loading import load_model_and_tokenizer
    from ..persistence import load_adapter

    if model is None and experiment is None:
        hint = ""
        if adapter.meta["base_model"].get("architecture") == "VisionMamba":
            hint = (f" It is a Vision Mamba adapter without {RESULT_NAME} (written when `lily-ssm vtab` finishes a "
                    "task), so its model cannot be rebuilt.")
        raise ValueError(f"no base model for {adapter.folder}: pass --model (a hub id, local folder or "
                         f"builtin:tiny-falcon-mamba), or keep the {EXPERIMENT_NAME} that `lily-ssm train` writes in "
                         f"the adapter folder.{hint}")
    if model is None:  # the run's own model, dtype and tokenizer
        lm, tokenizer = load_model_and_tokenizer(experiment["name_or_path"], dtype or experiment["dtype"],
                                                 tokenizer=experiment["tokenizer"],
                                                 trust_remote_code=experiment["trust_remote_code"])
    else:
        lm, tokenizer = load_model_and_tokenizer(model, dtype or "auto")
    load_adapter(lm, adapter.folder)
    return lm, tokenizer, int(experiment["cutoff_len"]) if experiment else 256


def _vtab_model(adapter: SavedAdapter, task: str, log: Callable[[str], Any]) -> tuple[Any, Any]:
    """The adapted VTAB backbone (Vim or ViT) a task folder's ``result.json`` names, and its image settings."""
    from ..persistence import load_adapter
    from ..train.vtab import (
        VtabDataSection,
        VtabExperiment,
        VtabModelSection,
        VtabTrainingSection,
        build_model,
        image_settings,
    )

    config = adapter.vtab["config"]
    try:
        section = VtabModelSection(**config["model"])
        section.check()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{adapter.folder / RESULT_NAME}: config.model is not a VTAB model section: {exc}") from exc
    experiment = VtabExperiment(model=section, adapter=dict(config.get("adapter") or adapter.meta["config"]),
                                data=VtabDataSection(root=""), training=VtabTrainingSection(output_dir=""))
    seed = (config.get("training") or {}).get("seed", VtabTrainingSection.seed)
    if not section.checkpoint:
        log(f"  {adapter.name}: {RESULT_NAME} names no {section.kind} checkpoint, so the base is a fresh random init "
            f"(seed {seed}); the router weights are those of the adapter on that base")
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = build_model(experiment, task)
    load_adapter(model, adapter.folder)
    return model, image_settings(section, model)


@torch.no_grad()
def record_mixes(adapter: SavedAdapter, data: str, model: str | None = None, limit: int = 64,
                 batch_size: int = 8, dtype: str | None = None, device: str | None = None,
                 log: Callable[[str], Any] = print) -> None:
    """Run the first ``limit`` items of ``data`` through the adapted model and store each sample's mean
    router mix per slot (``adapter.mixes``) and the mean router weights per type (``adapter.router_matrices``)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if adapter.vtab is not None:
        from torch.utils.data import DataLoader, Subset

        from ..data.vtab import VTabDataset

        task = adapter.vtab.get("task", adapter.folder.name)
        if not (Path(data) / task / "test.txt").is_file():
            raise FileNotFoundError(f"--data {data} has no {task}/test.txt; for the VTAB task folder "
                                    f"{adapter.folder} give the VTAB-1K root (with <task>/test.txt)")
        if model is not None:
            log(f"  {adapter.name}: --model is not used for a VTAB task folder; its backbone is rebuilt from "
                f"{RESULT_NAME}")
        net, images = _vtab_model(adapter, task, log)
        dataset = VTabDataset(data, task, "test", image_size=images.size, mean=images.mean, std=images.std)
        loader = DataLoader(Subset(dataset, range(min(limit, len(dataset)))), batch_size=batch_size)
        batches = ((pixels,) for pixels, _ in loader)
        source = f"{data} ({task} test)"
    else:
        experiment = _experiment_model(adapter.folder)
        protocol = experiment["protocol"] if experiment else "paper"
        prompts = commonsense_prompts(data, limit, protocol)  # a bad data path fails before the model loads
        net, tokenizer, cutoff = _language_model(adapter, model, dtype, experiment)
        tokenizer.padding_side = "left"
        batches = (tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                             max_length=cutoff) for i in range(0, len(prompts), batch_size))
        source = data
    net.to(device).eval()
    log(f"  {adapter.name}: recording router weights on {source}")
    samples = 0
    with record_router_weights(net, per_sample=True) as recorder:
        for batch in batches:
            if isinstance(batch, tuple):
                recorder.batch_size = len(batch[0])
                net(batch[0].to(device))
            else:
                recorder.batch_size = len(batch["input_ids"])
                net(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    use_cache=False)
            samples += recorder.batch_size
    adapter.mixes = {key: rows.double() for key, rows in recorder.samples.items()}
    adapter.router_matrices = router_matrix(net, recorder)
    adapter.samples = samples


# ----------------------------------------------------------------------------------------------
# Figures


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


# ----------------------------------------------------------------------------------------------
# The command


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
    log(f"inspect: wrote {', '.join(Path(f).name for f in summary['figures'])} and inspect.json to {out}")
    return summary

"""Saved adapters read without their base model, and the numbers ``lily-ssm inspect`` draws: the effective rank
of ΔW per layer (paper Fig. 3) and how much each B expert is used."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config.record import ExperimentRecord, read_record
from ..persistence import CONFIG_NAME, read_adapter
from ..tuners import config_from_dict
from ..tuners.targets import a_group
from .rank import DEFAULT_RTOL, lily_sample_ranks, lora_layer_ranks


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
    record: ExperimentRecord | None = None  # the run that made it (experiment.yaml or a VTAB task's result.json)
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
    return SavedAdapter(folder, name or folder.resolve().name, config.method, meta, types, read_record(folder))


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

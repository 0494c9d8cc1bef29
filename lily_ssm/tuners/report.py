"""How many parameters an adapter trains, by target type and by kind (A, B, router)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .model import get_adapter_state


@dataclass(frozen=True)
class ParameterReport:
    """Trainable parameter counts; ``str()`` gives a table."""

    method: str
    by_target: dict[str, dict[str, int]]  # target type -> kind -> count
    other_trainable: int  # trainable parameters outside the adapter (e.g. a classifier head)
    base_parameters: int  # parameters of the model outside the adapter
    budget: int | None = None  # the parameter budget the adapter was sized for, if any

    @property
    def adapter_total(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.by_target.values())

    @property
    def trainable(self) -> int:
        return self.adapter_total + self.other_trainable

    def by_kind(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for kinds in self.by_target.values():
            for kind, count in kinds.items():
                totals[kind] = totals.get(kind, 0) + count
        return totals

    def __str__(self) -> str:
        kinds = sorted({k for v in self.by_target.values() for k in v}, key=["A", "B", "router"].index)
        header = ["target", *kinds, "total"]
        rows = [[t, *(f"{v.get(k, 0):,}" for k in kinds), f"{sum(v.values()):,}"] for t, v in self.by_target.items()]
        by_kind = self.by_kind()
        rows.append(["all", *(f"{by_kind.get(k, 0):,}" for k in kinds), f"{self.adapter_total:,}"])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [f"{self.method} adapter parameters"]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in [header, *rows]]
        share = 100.0 * self.trainable / max(self.base_parameters, 1)
        if self.other_trainable:
            lines.append(f"other trainable: {self.other_trainable:,}")
        lines.append(f"trainable {self.trainable:,} of base {self.base_parameters:,} ({share:.4f}%)")
        if self.budget is not None:
            lines.append(f"budget {self.budget:,}: adapter {self.adapter_total:,} "
                         f"({self.adapter_total / self.budget - 1:+.1%})")
        return "\n".join(lines)


def parameter_report(model: nn.Module, budget: int | None = None) -> ParameterReport:
    """Count the trainable parameters of ``model``'s adapter by target type and kind; with ``budget``
    (e.g. from :func:`lily_ssm.tuners.budget.match_budget`) the report also shows the deviation."""
    state = get_adapter_state(model)
    by_target = {key: {kind: p.numel() for kind, p in pool.parameter_kinds().items()}
                 for key, pool in state.pools.items()}
    adapter_ids = {id(p) for p in state.parameters()}
    others = [p for p in model.parameters() if id(p) not in adapter_ids]
    return ParameterReport(
        method=state.config.method,
        by_target=by_target,
        other_trainable=sum(p.numel() for p in others if p.requires_grad),
        base_parameters=sum(p.numel() for p in others),
        budget=budget,
    )

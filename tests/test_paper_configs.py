"""Every shipped paper config has the parameter count its header states, and that count matches the
paper's figure within 1% or the header says why it cannot be compared."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_merge_and_report import falcon_mamba_7b_meta

import lily_ssm
from lily_ssm.config.experiment import load_config
from lily_ssm.config.vtab import load_vtab_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_CONFIGS = sorted((CONFIGS / "falcon-mamba-7b").glob("*.yaml")) + [
    CONFIGS / "vim" / name for name in ("lily_s.yaml", "lily_l.yaml", "lora.yaml")] + [CONFIGS / "vit" / "lily.yaml"]
_STATED = re.compile(r"([\d,]{5,}) trainable parameters(?: \(the paper: ([\d.]+)M\))?")
_NO_FIGURE = "not in our copy of the paper"


def _count(path: Path, per_task: dict | None = None) -> int:
    if path.parent.name in ("vim", "vit"):
        experiment = load_vtab_config(path)
        if per_task is not None:
            experiment.adapter["per_task"] = per_task
        with torch.device("meta"):
            model = experiment.build_model("cifar")
    else:
        model = lily_ssm.apply_adapter(falcon_mamba_7b_meta(), load_config(path).adapter_config())
    return lily_ssm.parameter_report(model).adapter_total


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_paper_config_count_is_stated_and_matches_the_paper(path):
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    found = _STATED.search(header.replace("\n# ", " "))
    assert found, f"{path.name}: the header states no '<N> trainable parameters'"
    stated, paper = int(found.group(1).replace(",", "")), found.group(2)
    assert _count(path) == stated
    if paper is not None:
        assert abs(stated / (float(paper) * 1e6) - 1) <= 0.01, f"{stated:,} vs the paper's {paper}M"
    else:
        assert _NO_FIGURE in header.replace("\n# ", " "), f"{path.name}: no paper figure and no reason given"


def test_lily_l_is_the_published_scripts_parameter_count():
    """visual-adaptation-benchmark/vim/lily.py with --in_dim 8 --ne 5 --delta_dim 4 on Vim-S (24 layers, d 384,
    d_inner 768, dt_rank 24): per-layer in_proj A, shared B experts and one router; per-layer Δ down
    projections and one shared up projection per direction."""
    layers, d, d_inner, dt_rank = 24, 384, 768, 24
    in_proj = layers * d * 8 + 5 * 8 * 2 * d_inner + 8 * 5
    delta = 2 * (layers * dt_rank * 4 + 4 * d_inner)
    assert _count(CONFIGS / "vim" / "lily_l.yaml") == in_proj + delta == 145_960


def test_vim_per_task_expert_counts():
    assert _count(CONFIGS / "vim" / "lily_s.yaml", per_task={"cifar": {"num_B": 6}}) == 84_504
    assert _count(CONFIGS / "vim" / "lily_s.yaml", per_task={"dtd": {"num_B": 6}}) == 66_060  # another task


def test_vim_per_task_settings_are_checked_when_the_config_loads():
    from lily_ssm.utils.sections import ConfigError

    path = CONFIGS / "vim" / "lily_s.yaml"
    with pytest.raises(ConfigError, match="adapter.per_task has unknown task\\(s\\) mnist; tasks: caltech101"):
        load_vtab_config(path, ["adapter.per_task={mnist: {num_B: 6}}"])
    with pytest.raises(ConfigError, match="adapter \\(task dtd\\): num_B=0"):
        load_vtab_config(path, ["adapter.per_task={dtd: {num_B: 0}}"])
    merged = load_vtab_config(path, ["adapter.per_task={dtd: {overrides: {dt_proj: {r: 2}}}}"])

    overrides = merged.task_adapter("dtd")["overrides"]
    assert overrides["dt_proj"] == {"r": 2, "num_B": 1, "dropout": 0.0} and overrides["dt_proj_b"]["r"] == 4

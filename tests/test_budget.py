"""Sizing adapters to a parameter budget (rank before experts) for every preset target set."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_family, tiny_mamba
from test_merge_and_report import falcon_mamba_7b_meta
from test_vim import tiny_vim

import lily_ssm
from lily_ssm.ablation.config import TARGET_SETS
from lily_ssm.tuners.budget import BudgetError, count_parameters, match_budget
from lily_ssm.tuners.report import parameter_report
from lily_ssm.tuners.targets import find_targets

TEMPLATES = {"lily": {"method": "lily", "num_A": 2, "num_B": 3, "routing": "causal"},
             "lora": {"method": "lora", "alpha_per_rank": 2.0}}


def applied_count(model, match) -> int:
    adapted = lily_ssm.apply_adapter(model, match.config)
    return parameter_report(adapted, budget=match.budget).adapter_total


@pytest.mark.parametrize("method", ["lily", "lora"])
@pytest.mark.parametrize(("path", "make", "budget"), [("language", lambda: tiny_mamba("falcon"), 8000),
                                                      ("language-mamba2", lambda: tiny_family("mamba2"), 6000),
                                                      ("vim", tiny_vim, 12000)])
def test_every_preset_lands_within_five_percent(path, make, budget, method):
    model = make()
    for name, targets in TARGET_SETS[path].items():
        match = match_budget(model, {**TEMPLATES[method], "targets": targets}, budget)
        assert abs(match.deviation) <= 0.05, (name, match)
        assert applied_count(make(), match) == match.parameters  # the count is the real model's


def test_falcon_mamba_7b_lily_presets_at_the_paper_budget():
    """The paper's Lily budget (in_proj, r 40, 4 A / 4 B = 3,287,040) for every language target set."""
    model = falcon_mamba_7b_meta()
    for name, targets in TARGET_SETS["language"].items():
        match = match_budget(model, {"method": "lily", "targets": targets, "num_A": 4, "num_B": 4}, 3_287_040)
        assert abs(match.deviation) <= 0.05, name
    paper = match_budget(model, {"method": "lily", "targets": ["in_proj"], "num_A": 4, "num_B": 4}, 3_287_040)
    assert (paper.config.r, paper.config.num_A, paper.config.num_B, paper.parameters) == (40, 4, 4, 3_287_040)


def test_unreachable_budget_names_the_nearest_sizes():
    # LoRA on the 7B in_proj moves in steps of 64 * (4096 + 16384) = 1,310,720 parameters per rank
    with pytest.raises(BudgetError, match=r"r=2 -> 2,621,440 \(-20\.2%\)"):
        match_budget(falcon_mamba_7b_meta(), {"method": "lora", "targets": ["in_proj"]}, 3_287_040)


def test_rank_grows_before_experts():
    model = tiny_mamba("falcon")
    template = {"method": "lily", "targets": ["in_proj"], "num_A": 2, "num_B": 3}
    sizes = [match_budget(model, template, budget).config for budget in (2000, 4000, 8000)]
    assert [(c.num_A, c.num_B) for c in sizes] == [(2, 3)] * 3
    assert sizes[0].r < sizes[1].r < sizes[2].r


def test_experts_move_only_when_no_rank_fits_and_the_change_is_noted():
    model = tiny_mamba("falcon")
    # in_proj with 2 A / 3 B costs 3 * (2*16 + 3*64 + 3*3) = 699 per rank: 300 parameters is below r=1
    match = match_budget(model, {"method": "lily", "targets": ["in_proj"], "num_A": 2, "num_B": 3}, 300, 0.05)
    assert abs(match.deviation) <= 0.05 and match.config.r >= 1
    assert (match.config.num_A, match.config.num_B) != (2, 3) and match.config.num_B >= 2  # routing is kept
    assert any("num_" in note for note in match.notes)


def test_template_errors():
    model = tiny_mamba("falcon")
    with pytest.raises(ValueError, match="budget matching chooses 'r'"):
        match_budget(model, {"method": "lora", "targets": ["in_proj"], "r": 4}, 1000)
    with pytest.raises(ValueError, match="budget matching chooses 'stride_A'"):
        match_budget(model, {"method": "lily", "targets": ["in_proj"], "num_A": 2, "num_B": 2, "stride_A": 2}, 1000)
    with pytest.raises(ValueError, match="budget=0"):
        match_budget(model, {"method": "lora", "targets": ["in_proj"]}, 0)
    with pytest.raises(ValueError, match="knows lily and lora"):
        match_budget(model, {"method": "dora", "targets": ["in_proj"]}, 1000)


def test_report_shows_the_budget_and_counts_agree_with_the_meta_count():
    model = tiny_mamba("falcon")
    match = match_budget(model, {"method": "lily", "targets": ["in_proj.x", "dt_proj"], "num_A": 3, "num_B": 2}, 3000)
    assert count_parameters(find_targets(model, ["in_proj.x", "dt_proj"]), match.config) == match.parameters
    report = parameter_report(lily_ssm.apply_adapter(model, match.config), budget=3000)
    assert f"budget 3,000: adapter {match.parameters:,} ({match.deviation:+.1%})" in str(report)
    assert all(p.device == torch.device("cpu") for p in model.lily_ssm_adapter.parameters())


def test_requests_without_routing_keep_one_b_and_caps_are_noted():
    model = tiny_mamba("falcon")
    single = match_budget(model, {"method": "lily", "targets": ["in_proj"], "num_A": 1, "num_B": 1}, 300)
    assert single.config.num_B == 1 and abs(single.deviation) <= 0.05
    capped = match_budget(model, {"method": "lily", "targets": ["in_proj"], "num_A": 10, "num_B": 2}, 4000)
    assert capped.config.num_A == 3 and capped.notes[0] == "num_A 10 capped at 3, the number of layers"
    assert not any("tolerance" in note for note in capped.notes)


def test_lora_alpha_fixed_or_per_rank():
    model = tiny_mamba("falcon")
    fixed = match_budget(model, {"method": "lora", "targets": ["in_proj"], "alpha": 16.0}, 2400)
    assert fixed.config.r == 10 and fixed.config.alpha == 16.0
    per_rank = match_budget(model, {"method": "lora", "targets": ["in_proj"], "alpha_per_rank": 1.5}, 2400)
    assert per_rank.config.alpha == 15.0
    with pytest.raises(ValueError, match="not both"):
        match_budget(model, {"method": "lora", "targets": ["in_proj"], "alpha": 16.0, "alpha_per_rank": 2}, 2400)

"""`lily-ssm train --dry-run`: the planned peak memory of the paper's 7B runs, from the real shapes on
the meta device, fits one 24 GB GPU; the planner's parts behave as documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lily_ssm.analysis.memory import GIB, plan_training_memory
from lily_ssm.cli import main as cli
from lily_ssm.config.experiment import load_config

SEVEN_B = sorted((Path(__file__).resolve().parents[1] / "configs" / "falcon-mamba-7b").glob("*.yaml"))


@pytest.mark.parametrize("path", SEVEN_B, ids=lambda p: p.name)
def test_the_paper_7b_runs_fit_one_24gb_gpu(path):
    plan = plan_training_memory(load_config(path))
    assert plan.total <= 22 * GIB, plan.table()
    frozen = next(v for k, v in plan.terms.items() if k.startswith("frozen weights"))
    assert 13.4 * GIB < frozen < 13.7 * GIB  # 7.27B bf16 weights
    stated = re.search(r"Planned peak on one GPU: ([\d.]+) GiB", path.read_text())
    assert stated and abs(float(stated.group(1)) - plan.total / GIB) < 0.05, "the header states the plan"


def test_gradient_checkpointing_lowers_the_planned_activations():
    config = load_config(SEVEN_B[0], ["training.gradient_checkpointing=true"])
    plain = plan_training_memory(load_config(SEVEN_B[0]))
    checkpointed = plan_training_memory(config)
    key = "saved activations (64 layers)"
    assert checkpointed.terms[key] < plain.terms[key]  # each block keeps only its input


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", str(SEVEN_B[0]), "--dry-run", "--set", f"training.output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "planned peak memory" in printed and "fits a 24 GB GPU: yes" in printed and not out.exists()


def test_model_configs_are_read_without_weights_and_offline(monkeypatch, tmp_path):
    """The known 7B architecture needs no hub; a local folder is read as is; an unknown hub id offline is one
    clear error naming it and what would work."""
    from transformers import FalconMambaConfig

    from lily_ssm.models.loading import build_meta_model, load_model_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert load_model_config("tiiuae/falcon-mamba-7b").hidden_size == 4096
    FalconMambaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      state_size=4).save_pretrained(tmp_path / "local")
    model = build_meta_model(str(tmp_path / "local"))
    assert model.config.hidden_size == 16 and next(model.parameters()).device.type == "meta"
    with pytest.raises(ValueError, match=r"'nobody/no-such-model' is not in the local Hugging Face cache.*HF_HUB_OFF"
                                         r".*plan without it: one of tiiuae/falcon-mamba-7b"):
        load_model_config("nobody/no-such-model")

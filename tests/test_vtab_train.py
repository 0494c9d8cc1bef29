"""`lily-ssm vtab`: a tiny Vim trained on a generated VTAB-layout folder, resumable, with a summary table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lily_ssm.cli import main as cli
from lily_ssm.data.vtab import write_fake_vtab
from lily_ssm.train.vtab import load_vtab_config, run_vtab_task, summarize

TINY = Path(__file__).resolve().parents[1] / "configs" / "vim" / "tiny.yaml"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    write_fake_vtab(root, "eurosat", classes=3, per_class=8, image_size=32, per_class_test=4)
    return root


def test_training_lowers_the_loss_and_reports_test_accuracy(root, tmp_path):
    experiment = load_vtab_config(TINY, [f"data.root={root}", f"training.output_dir={tmp_path}",
                                         "training.epochs=12", "training.eval_every=4"])
    result = run_vtab_task(experiment, "eurosat", log=lambda *_: None)
    history = json.loads((tmp_path / "eurosat" / "train_state.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["best_test_accuracy_seen"] >= result["test_accuracy"]
    assert result["head_parameters"] == 32 * 10 + 10  # eurosat has 10 classes; the head trains with the adapter
    table = summarize({"eurosat": result}, tmp_path)
    assert "best test acc. seen (selection on test)" in table and "| **Specialized** |" in table


def test_an_interrupted_run_resumes(root, tmp_path):
    messages = []
    args = [f"data.root={root}", f"training.output_dir={tmp_path}", "training.eval_every=2"]
    run_vtab_task(load_vtab_config(TINY, [*args, "training.epochs=2"]), "eurosat", log=messages.append)
    result = run_vtab_task(load_vtab_config(TINY, [*args, "training.epochs=4"]), "eurosat", log=messages.append)
    assert any("resuming after epoch 2" in m for m in messages)
    state = json.loads((tmp_path / "eurosat" / "train_state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4] and result["epochs"] == 4


def test_cli_errors(root, tmp_path, capsys):
    assert cli(["vtab", str(TINY), "--task", "mnist", "--set", f"data.root={root}"]) == 2
    assert "unknown VTAB task(s) mnist" in capsys.readouterr().err
    assert cli(["vtab", str(TINY), "--task", "dtd", "--set", f"data.root={root}",
                "--set", f"training.output_dir={tmp_path}"]) == 2
    assert "train800val200.txt" in capsys.readouterr().err  # the missing list file is named


@pytest.mark.parametrize("path", sorted(TINY.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_vim_configs_build(path):
    experiment = load_vtab_config(path)
    assert experiment.adapter["targets"] == ["in_proj", "dt_proj", "dt_proj_b"]

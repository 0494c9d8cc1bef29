"""Every input is checked before anything heavy starts (issue 23): a missing data file, data root, model,
tokenizer, checkpoint or a bad value fails with one line before a model loads or builds, and leaves nothing
behind (no output folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lily_ssm.cli import main as cli
from lily_ssm.config.vtab import VtabExperiment
from lily_ssm.models import loading
from lily_ssm.train import trainer as trainer_module

TINY_VIM = Path(__file__).resolve().parents[1] / "configs" / "vim" / "tiny.yaml"
ROW = {"instruction": "q", "input": "", "output": "the correct answer is true", "answer": "true"}


@pytest.fixture
def nothing_loads(monkeypatch):
    def fail(*_, **__):
        pytest.fail("a model was loaded or built")

    monkeypatch.setattr(trainer_module, "load_model_and_tokenizer", fail)
    monkeypatch.setattr(loading, "load_model_and_tokenizer", fail)
    monkeypatch.setattr(loading, "build_meta_model", fail)
    monkeypatch.setattr(VtabExperiment, "build_model", fail)


def one_error_line(capsys, command: str, needle: str) -> None:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lily-ssm {command}: error: ") and needle in lines[0], lines


def language_files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "train.json").write_text(json.dumps([ROW] * 4))
    (tmp_path / "tests" / "boolq").mkdir(parents=True)
    (tmp_path / "tests" / "boolq" / "test.json").write_text(json.dumps([ROW] * 2))
    return {"train_file": str(tmp_path / "train.json"), "data_root": str(tmp_path / "tests")}


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("data.train_file", "{tmp}/missing.json", "data.train_file: data file {tmp}/missing.json does not exist"),
    ("data.train_file", "{tmp}", "data.train_file: data file {tmp} is a folder"),
    ("data.train_file", "builtin:nope", "data.train_file: unknown built-in data set 'builtin:nope'"),
    ("model.name_or_path", "./no-model", "model.name_or_path: model folder ./no-model does not exist"),
    ("model.name_or_path", "builtin:nope", "model.name_or_path: unknown built-in model 'builtin:nope'"),
    ("model.tokenizer", "{tmp}/no-tokenizer", "model.tokenizer: tokenizer folder {tmp}/no-tokenizer does not exist"),
    ("model.dtype", "float8", "model.dtype: dtype='float8'; choose one of auto"),
])
def test_train_checks_its_inputs_first(tmp_path, capsys, nothing_loads, key, value, needle):
    files = language_files(tmp_path)
    out = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": "builtin:tiny-falcon-mamba"},
        "adapter": {"method": "lora", "targets": ["in_proj"], "r": 2, "alpha": 4},
        "data": {"train_file": files["train_file"], "val_set_size": 0},
        "training": {"output_dir": str(out), "max_steps": 1, "batch_size": 1, "micro_batch_size": 1}}))
    tmp = str(tmp_path)
    assert cli(["train", str(config), "--set", f"{key}={value.format(tmp=tmp)}"]) == 2
    one_error_line(capsys, "train", needle.format(tmp=tmp))
    assert not out.exists()


@pytest.mark.parametrize(("setting", "needle"), [
    ("data.root={tmp}/nowhere", "data.root='{tmp}/nowhere' is not a folder"),
    ("data.root={tmp}", "data.root: {tmp}/eurosat/train800val200.txt is missing"),
    ("model.checkpoint={tmp}/vim.pth", "model.checkpoint='{tmp}/vim.pth' is not a file; give a Vim .pth"),
])
def test_vtab_checks_every_task_first(tmp_path, capsys, nothing_loads, setting, needle):
    out, tmp = tmp_path / "runs", str(tmp_path)
    root = setting if setting.startswith("data.root") else f"data.root={tmp}"
    assert cli(["vtab", str(TINY_VIM), "--task", "eurosat", "--set", root.format(tmp=tmp), "--set",
                setting.format(tmp=tmp), "--set", f"training.output_dir={out}"]) == 2
    one_error_line(capsys, "vtab", needle.format(tmp=tmp))
    assert not out.exists()


def test_ablate_checks_its_inputs_before_planning(tmp_path, capsys, nothing_loads, monkeypatch):
    from lily_ssm.ablation import runner

    monkeypatch.setattr(runner, "plan_arms", lambda *_: pytest.fail("the arms were planned"))
    files = language_files(tmp_path)
    out = tmp_path / "abl"
    config = tmp_path / "abl.yaml"
    config.write_text(yaml.safe_dump({
        "ablation": {"output_dir": str(out), "budget": 1000, "methods": ["lora"], "target_sets": ["in"]},
        "model": {"name_or_path": "./no-model"},
        "data": {"train_file": files["train_file"], "val_set_size": 0},
        "training": {"max_steps": 1, "batch_size": 1, "micro_batch_size": 1},
        "evaluation": {"data_root": files["data_root"], "tasks": "boolq"}}))
    assert cli(["ablate", str(config)]) == 2
    one_error_line(capsys, "ablate", "model.name_or_path: model folder ./no-model does not exist")
    assert cli(["ablate", str(config), "--set", "model.name_or_path=builtin:tiny-falcon-mamba",
                "--set", f"data.train_file={tmp_path / 'missing.jsonl'}"]) == 2
    one_error_line(capsys, "ablate", "data.train_file: data file")
    assert not out.exists()


def test_eval_commonsense_and_inspect_check_the_model_first(tmp_path, capsys, nothing_loads):
    from conftest import tiny_mamba

    import lily_ssm

    files = language_files(tmp_path)
    assert cli(["eval-commonsense", "--model", "./no-model", "--data-root", files["data_root"], "--tasks", "boolq",
                "--output", str(tmp_path / "eval")]) == 2
    one_error_line(capsys, "eval-commonsense", "model folder ./no-model does not exist")
    assert not (tmp_path / "eval").exists()

    model = lily_ssm.apply_adapter(tiny_mamba(), lily_ssm.LilyConfig(["in_proj"], r=2, num_A=1, num_B=2))
    lily_ssm.save_adapter(model, tmp_path / "adapter")
    assert cli(["inspect", str(tmp_path / "adapter"), "--data", files["data_root"], "--model", "./no-model",
                "--out", str(tmp_path / "figures")]) == 2
    one_error_line(capsys, "inspect", "model folder ./no-model does not exist")
    assert not (tmp_path / "figures").exists()

"""Rerunning a command continues its run (issue 23): an interrupted run resumes from its last complete checkpoint
and says from where, a finished run is reported rather than trained again, for ``train``, each ``vtab`` task and
each ``ablate`` arm. A kill is simulated by failing right after a checkpoint is complete."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import language_assets
from safetensors.torch import load_file

from lily_ssm.cli import main as cli
from lily_ssm.config.experiment import parse_config
from lily_ssm.config.vtab import VtabExperiment, load_vtab_config
from lily_ssm.data.vtab import write_fake_vtab
from lily_ssm.train import trainer as trainer_module
from lily_ssm.train import vtab as vtab_module
from lily_ssm.train.trainer import run_training
from lily_ssm.train.vtab import run_vtab_task
from lily_ssm.utils.sections import ConfigError

TINY_VIM = Path(__file__).resolve().parents[1] / "configs" / "vim" / "tiny.yaml"


class Killed(Exception):
    """Stands for the process dying (Ctrl-C) at that point."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return language_assets(tmp_path_factory.mktemp("assets"), train_per_task=4, test_per_task=2)


def experiment(assets, out, **training):
    return {"model": {"name_or_path": assets["base"], "dtype": "float32"},
            "adapter": {"method": "lily", "targets": ["in_proj"], "r": 4, "num_A": 1, "num_B": 2},
            "data": {"train_file": assets["train_file"], "cutoff_len": 64, "val_set_size": 0, "protocol": "clean"},
            "training": {"output_dir": str(out), "max_steps": 6, "batch_size": 4, "micro_batch_size": 4,
                         "learning_rate": 1e-2, "warmup_steps": 0, "save_steps": 3, "logging_steps": 3,
                         "progress_bar": False, **training}}


def _kill_after_checkpoint(monkeypatch, step):
    original = trainer_module.mark_checkpoint_complete

    def marker(folder, at):
        original(folder, at)
        if at == step:
            raise Killed

    monkeypatch.setattr(trainer_module, "mark_checkpoint_complete", marker)


def _no_model_load(monkeypatch):
    monkeypatch.setattr(trainer_module, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model loaded"))


def _resume_lines(lines):
    return [line for line in lines if "resuming" in line]


def test_an_interrupted_run_continues_by_default_and_says_from_where(assets, tmp_path, monkeypatch):
    run_training(parse_config(experiment(assets, tmp_path / "ref")), log=lambda *_: None)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _kill_after_checkpoint(patch, 3)
        with pytest.raises(Killed):
            run_training(parse_config(experiment(assets, out)), log=lambda *_: None)
    assert not (out / "adapter_model.safetensors").exists()
    lines: list[str] = []
    result = run_training(parse_config(experiment(assets, out)), log=lines.append)  # the same settings, no flag
    assert _resume_lines(lines) == ["resuming from checkpoint-3 (step 3 of 6)"]
    assert result["global_step"] == 6
    final, reference = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "ref" /
                                                                               "adapter_model.safetensors")
    assert set(final) == set(reference) and all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_finished_run_is_reported_and_overwrite_starts_over(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(experiment(assets, out)))
    assert cli(["train", str(config)]) == 0
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _no_model_load(patch)
        assert cli(["train", str(config)]) == 0
    printed = capsys.readouterr().out
    assert f"{out} holds this run, already finished (6 steps): adapter {out}/, log {out / 'train_log.jsonl'}; set " \
           "training.overwrite: true to train it again" in printed
    assert "adapter written to" not in printed and "resuming" not in printed
    with pytest.raises(ConfigError, match="remove training.resume: false to continue it, or set training.overwrite"):
        run_training(parse_config(experiment(assets, out, resume=False)), log=lambda *_: None)
    lines: list[str] = []
    again = run_training(parse_config(experiment(assets, out, overwrite=True)), log=lines.append)
    assert again["global_step"] == 6 and not _resume_lines(lines)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_resume_false_starts_an_empty_folder_and_auto_is_the_documented_default(assets, tmp_path):
    from lily_ssm.config.experiment import TrainingSection
    from lily_ssm.config.vtab import VtabTrainingSection

    assert TrainingSection.__dataclass_fields__["resume"].default == "auto"
    assert VtabTrainingSection.__dataclass_fields__["resume"].default == "auto"
    lines: list[str] = []
    result = run_training(parse_config(experiment(assets, tmp_path / "run", resume=False, max_steps=3)),
                          log=lines.append)
    assert result["global_step"] == 3 and not _resume_lines(lines)


def test_a_vtab_task_resumes_says_so_and_a_finished_task_is_reported(tmp_path, monkeypatch):
    root = tmp_path / "vtab"
    write_fake_vtab(root, "eurosat", classes=3, per_class=4, image_size=32, per_class_test=2)
    args = [f"data.root={root}", f"training.output_dir={tmp_path / 'out'}", "training.epochs=3",
            "training.eval_every=3"]
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if ".checkpoint-2." in str(path):
            raise Killed
        return real_save(obj, path, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(vtab_module.torch, "save", dying_save)
        with pytest.raises(Killed):
            run_vtab_task(load_vtab_config(TINY_VIM, args), "eurosat", log=lambda *_: None)
    lines: list[str] = []
    result = run_vtab_task(load_vtab_config(TINY_VIM, args), "eurosat", log=lines.append)
    assert _resume_lines(lines) == ["eurosat: resuming from checkpoint-1 (epoch 1 of 3)"]
    lines.clear()
    with monkeypatch.context() as patch:
        patch.setattr(VtabExperiment, "build_model", lambda *a: pytest.fail("the model was built"))
        again = run_vtab_task(load_vtab_config(TINY_VIM, args), "eurosat", log=lines.append)
    task = tmp_path / "out" / "eurosat"
    assert lines == [f"eurosat: already finished (3 epochs): result {task / 'result.json'}, adapter {task}/; set "
                     "training.overwrite: true to train it again"]
    assert again == result
    with pytest.raises(ConfigError, match="training.resume: false, but"):
        run_vtab_task(load_vtab_config(TINY_VIM, [*args, "training.resume=false"]), "eurosat", log=lambda *_: None)


def test_an_ablation_arm_resumes_and_a_finished_arm_is_evaluated_without_training(assets, tmp_path, monkeypatch):
    from lily_ssm.ablation import parse_ablation, plan_arms, runner

    raw = {"ablation": {"output_dir": str(tmp_path / "abl"), "budget": 3000, "methods": ["lora"],
                        "target_sets": ["in"]},
           "model": {"name_or_path": assets["base"], "dtype": "float32"},
           "data": {"train_file": assets["train_file"], "cutoff_len": 64, "val_set_size": 0, "protocol": "clean"},
           "training": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 4, "learning_rate": 1e-2,
                        "warmup_steps": 0, "save_steps": 2, "logging_steps": 1, "progress_bar": False},
           "evaluation": {"data_root": assets["root"], "tasks": "boolq", "batch_size": 4, "max_new_tokens": 2,
                          "limit": 2}}
    config = parse_ablation(raw)
    arm = plan_arms(config)[0]
    spec, folder = runner.arm_spec(config, arm), tmp_path / "abl" / arm.name
    with monkeypatch.context() as patch:
        _kill_after_checkpoint(patch, 2)
        with pytest.raises(Killed):
            runner.run_arm(arm, spec, folder, log=lambda *_: None)
    lines: list[str] = []
    first = runner.run_arm(arm, spec, folder, log=lines.append)
    assert _resume_lines(lines) == ["resuming from checkpoint-2 (step 2 of 3)"]
    lines.clear()
    again = runner.run_arm(arm, spec, folder, log=lines.append)  # e.g. its evaluation was interrupted
    assert any("already finished (3 steps)" in line for line in lines) and not _resume_lines(lines)
    assert again["accuracy"] == first["accuracy"] and again["train_seconds"] == first["train_seconds"]
    with pytest.raises(ConfigError, match="training.resume is not an ablation setting"):
        parse_ablation({**raw, "training": {**raw["training"], "resume": False}})

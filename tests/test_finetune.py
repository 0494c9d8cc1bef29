"""Training through the Trainer, checkpoints and resume, evaluation, the CLI, and the quickstart."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import language_assets, randomise_adapter
from transformers import Trainer

import lily_ssm
from lily_ssm.cli import main as cli
from lily_ssm.config.experiment import parse_config
from lily_ssm.evaluation.commonsense import evaluate_commonsense
from lily_ssm.models.loading import load_model_and_tokenizer
from lily_ssm.quickstart import run_quickstart
from lily_ssm.train.trainer import LOG_NAME, run_training, training_seconds


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return language_assets(tmp_path_factory.mktemp("assets"))


def experiment(assets, out, **training):
    return {
        "model": {"name_or_path": assets["base"], "dtype": "float32"},
        "adapter": {"method": "lily", "targets": ["in_proj", "dt_proj"], "r": 4, "num_A": 1, "num_B": 2},
        "data": {"train_file": assets["train_file"], "cutoff_len": 96, "val_set_size": 8},
        "training": {"output_dir": str(out), "max_steps": 30, "batch_size": 8, "micro_batch_size": 8,
                     "learning_rate": 1e-2, "warmup_steps": 0, "eval_steps": 10, "save_steps": 10,
                     "logging_steps": 5, "progress_bar": False, **training},
    }


def log_rows(folder):
    return [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines()]


def test_training_loss_decreases_and_writes_adapter_and_log(assets, tmp_path):
    result = run_training(parse_config(experiment(assets, tmp_path / "run")), log=lambda *_: None)
    losses = [row["loss"] for row in log_rows(tmp_path / "run") if "loss" in row]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert any("tokens_per_second" in row for row in log_rows(tmp_path / "run"))
    assert any("eval_loss" in row for row in log_rows(tmp_path / "run"))
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "experiment.yaml", LOG_NAME} <= files
    checkpoint = tmp_path / "run" / "checkpoint-30"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not list(checkpoint.glob("model*.safetensors"))  # adapter-only checkpoints
    model, _ = load_model_and_tokenizer(assets["base"], dtype="float32")
    lily_ssm.load_adapter(model, tmp_path / "run")
    trained = result["model"]
    loaded = dict(model.lily_ssm_adapter.named_parameters())
    for name, param in trained.lily_ssm_adapter.named_parameters():
        assert torch.equal(param, loaded[name]), name


def test_report_to_tensorboard_writes_event_files(assets, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = parse_config(experiment(assets, tmp_path / "run", report_to="tensorboard", max_steps=4,
                                     eval_steps=2, save_steps=2, logging_steps=1))
    run_training(config, log=lambda *_: None)
    events = list((tmp_path / "run" / "runs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under the run folder"
    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"train/loss", "eval/loss"} <= set(scalars), scalars
    resumed = parse_config(experiment(assets, tmp_path / "run", report_to="none", max_steps=6, eval_steps=2,
                                      save_steps=2, logging_steps=1, resume=True))
    run_training(resumed, log=lambda *_: None)  # the tracker is not a training setting: resuming without it is fine


def test_resume_continues_from_the_saved_step(assets, tmp_path):
    out = tmp_path / "run"
    run_training(parse_config(experiment(assets, out, max_steps=10)), log=lambda *_: None)
    resumed = run_training(parse_config(experiment(assets, out, max_steps=20, resume=True)), log=lambda *_: None)
    assert resumed["global_step"] == 20
    steps = [row["step"] for row in log_rows(out) if "loss" in row]
    assert steps == [5, 10, 15, 20]  # the second run logged only steps after the checkpoint
    state = json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["global_step"] == 20
    starts = [row for row in log_rows(out) if row.get("run_start")]
    assert [row["resume_from"] for row in starts] == [None, str(out / "checkpoint-10")]
    runs = [max(row["train_runtime"] for row in rows if "train_runtime" in row)
            for rows in _split_runs(log_rows(out))]
    assert len(runs) == 2 and training_seconds(out / LOG_NAME) == pytest.approx(sum(runs))


def test_resuming_from_the_final_checkpoint_trains_nothing(assets, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from lily_ssm.train.trainer import AdapterTrainer

    out = tmp_path / "run"
    def killed_before_the_final_adapter(self, output_dir=None, _internal_call=False):
        if not _internal_call:  # checkpoints save with _internal_call=True
            raise KeyboardInterrupt
        return Trainer.save_model(self, output_dir, _internal_call)

    with monkeypatch.context() as patch:
        patch.setattr(AdapterTrainer, "save_model", killed_before_the_final_adapter)
        with pytest.raises(KeyboardInterrupt):
            run_training(parse_config(experiment(assets, out, max_steps=10)), log=lambda *_: None)
    final = load_file(out / "checkpoint-10" / "adapter_model.safetensors")
    lines = []
    again = run_training(parse_config(experiment(assets, out, max_steps=10)), log=lines.append)
    assert again["global_step"] == 10 and "resuming from checkpoint-10 (step 10 of 10)" in lines
    assert max(row["step"] for row in log_rows(out) if "step" in row) == 10
    saved = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], final[k]) for k in final)


def _split_runs(rows):
    runs = []
    for row in rows:
        if row.get("run_start"):
            runs.append([])
        else:
            runs[-1].append(row)
    return runs


def test_training_seconds_sums_the_runs_of_a_log(tmp_path):
    lines = [{"run_start": True}, {"step": 5, "train_runtime": 1.0}, {"step": 10, "train_runtime": 2.5},
             {"run_start": True, "resume_from": "checkpoint-5"}, {"step": 10, "train_runtime": 0.4},
             {"step": 10, "train_runtime": 1.5, "train_loss": 0.1}]
    (tmp_path / LOG_NAME).write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert training_seconds(tmp_path / LOG_NAME) == pytest.approx(4.0)
    assert training_seconds(tmp_path / "missing.jsonl") == 0.0


def test_evaluation_does_not_depend_on_batch_size(assets, tmp_path):
    model, tokenizer = load_model_and_tokenizer(assets["base"], dtype="float32")
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj", "dt_proj"], r=4, num_A=1, num_B=3))
    randomise_adapter(model, std=0.3)
    runs = {}
    for batch in (1, 7):
        out = tmp_path / f"b{batch}"
        evaluate_commonsense(model, tokenizer, assets["root"], batch_size=batch, max_new_tokens=6, output_dir=out,
                             protocol="clean",
                             log=lambda *_: None)
        runs[batch] = {p.name: p.read_text() for p in sorted((out / "predictions").iterdir())}
    assert runs[1] == runs[7] and len(runs[1]) == 8
    results = json.loads((tmp_path / "b1" / "results.json").read_text())
    assert set(results["tasks"]) == set(assets["test_files"]) and 0.0 <= results["average"] <= 1.0
    assert "| **average** |" in (tmp_path / "b1" / "results.md").read_text()


def test_cli_errors_are_clear(assets, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: x}\nadapter: {method: lily}\ndata: {train_file: d.json}\n"
                   "training: {output_dir: o}\n")
    assert cli(["train", str(bad)]) == 2
    assert "incomplete lily config" in capsys.readouterr().err
    assert cli(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "q", "output": 1}]')
    cfg = experiment(assets, tmp_path / "run")
    cfg["data"]["train_file"] = str(broken)
    good = tmp_path / "exp.yaml"
    import yaml

    good.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(good)]) == 2
    assert "broken.json: row 0 field 'output' is a int" in capsys.readouterr().err
    assert cli(["eval-commonsense", "--model", assets["base"], "--data-root", str(tmp_path), "--tasks", "boolq"]) == 2
    assert "boolq/test.json is missing" in capsys.readouterr().err
    assert cli(["eval-commonsense", "--model", assets["base"], "--data-root", assets["root"], "--tasks", "qa"]) == 2
    assert "unknown task(s) qa" in capsys.readouterr().err


def test_quickstart_reduced_runs_end_to_end(tmp_path):
    summary = run_quickstart(tmp_path / "qs", reduced=True, log=lambda *_: None)
    for name in ("results.json", "results.md", "router_weights.png", "adapter/adapter_model.safetensors",
                 "eval-untuned/results.json", "eval-lily/predictions/boolq.jsonl"):
        assert (tmp_path / "qs" / name).is_file(), name
    assert (tmp_path / "qs" / "router_weights.png").stat().st_size > 1000
    assert set(summary["lily"]["tasks"]) == set(summary["untuned"]["tasks"]) and len(summary["lily"]["tasks"]) == 8
    again = run_quickstart(tmp_path / "qs", reduced=True, log=lambda *_: None)  # a second run starts over
    assert again["lily"]["average"] == summary["lily"]["average"]


def test_effective_batch_must_divide_across_processes(assets, tmp_path):
    from lily_ssm.train.trainer import accumulation_steps
    from lily_ssm.utils.sections import ConfigError

    config = parse_config(experiment(assets, tmp_path / "run", batch_size=16, micro_batch_size=4))
    assert accumulation_steps(config, world=2) == 2
    with pytest.raises(ConfigError, match="not a multiple of training.micro_batch_size=4 x 8 process"):
        accumulation_steps(config, world=8)

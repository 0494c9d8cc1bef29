"""Training runs that are never silently wrong: complete checkpoints only, one run per folder, another
run's checkpoints refused, a stop at the first non-finite value, rows with nothing left to learn counted.

A kill at a chosen point is simulated by failing a write at that point."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from conftest import language_assets
from safetensors.torch import load_file

from lily_ssm.config.experiment import parse_config
from lily_ssm.train import trainer as trainer_module
from lily_ssm.train.guards import TrainingDivergedError
from lily_ssm.train.run_folder import CHECKPOINT_MARKER
from lily_ssm.train.trainer import run_training
from lily_ssm.utils.lock import FolderBusyError, folder_lock
from lily_ssm.utils.sections import ConfigError


class Killed(Exception):
    """Stands for the process dying at that point."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return language_assets(tmp_path_factory.mktemp("assets"))


def experiment(assets, out, **training):
    return {"model": {"name_or_path": assets["base"], "dtype": "float32"},
            "adapter": {"method": "lily", "targets": ["in_proj"], "r": 4, "num_A": 1, "num_B": 2},
            "data": {"train_file": assets["train_file"], "cutoff_len": 96, "val_set_size": 0, "protocol": "clean"},
            "training": {"output_dir": str(out), "max_steps": 20, "batch_size": 4, "micro_batch_size": 4,
                         "learning_rate": 1e-2, "warmup_steps": 0, "save_steps": 10, "logging_steps": 10,
                         "progress_bar": False, **training}}


def train(assets, out, log=None, **training):
    return run_training(parse_config(experiment(assets, out, **training)), log=log or (lambda *_: None))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted 20-step run's final adapter."""
    out = tmp_path_factory.mktemp("reference")
    train(assets, out)
    return load_file(out / "adapter_model.safetensors")


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _kill_while_saving(monkeypatch, step, where):
    """Make the checkpoint of ``step`` die at ``where``: before its marker, or in the middle of its weights."""
    if where == "before the marker":
        original = trainer_module.mark_checkpoint_complete

        def marker(folder, at):
            if at == step:
                raise Killed
            original(folder, at)

        monkeypatch.setattr(trainer_module, "mark_checkpoint_complete", marker)
    else:
        original_save = trainer_module.save_adapter

        def save(model, folder):
            if str(folder).endswith(f"checkpoint-{step}"):
                Path(folder).mkdir(parents=True, exist_ok=True)
                (Path(folder) / "adapter_model.safetensors").write_bytes(b"half a file")
                raise Killed
            return original_save(model, folder)

        monkeypatch.setattr(trainer_module, "save_adapter", save)


@pytest.mark.parametrize("where", ["before the marker", "mid-weights"])
def test_resume_skips_an_incomplete_newest_checkpoint(assets, tmp_path, monkeypatch, reference, where):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _kill_while_saving(patch, 20, where)
        with pytest.raises(Killed):
            train(assets, out)
    assert (out / "checkpoint-20").is_dir() and not (out / "checkpoint-20" / CHECKPOINT_MARKER).exists()
    lines: list[str] = []
    result = train(assets, out, log=lines.append, resume=True)
    assert any(line.startswith(f"warning: skipping {out / 'checkpoint-20'}") for line in lines)
    assert result["global_step"] == 20
    assert same(load_file(out / "adapter_model.safetensors"), reference)  # as if never interrupted
    assert (out / "checkpoint-20" / CHECKPOINT_MARKER).is_file()


def _interrupt_before_the_final_adapter(monkeypatch):
    """Make the run die after its last checkpoint, before it writes its final adapter."""
    original = trainer_module.AdapterTrainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if not _internal_call:
            raise Killed
        return original(self, output_dir, _internal_call)

    monkeypatch.setattr(trainer_module.AdapterTrainer, "save_model", save_model)


def test_a_damaged_file_makes_a_checkpoint_incomplete(assets, tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_before_the_final_adapter(patch)
        with pytest.raises(Killed):
            train(assets, out)
    with open(out / "checkpoint-20" / "optimizer.pt", "r+b") as handle:
        handle.truncate(100)
    lines: list[str] = []
    train(assets, out, log=lines.append)
    assert any("checkpoint-20: optimizer.pt differs" in line for line in lines)
    assert [line for line in lines if line.startswith("resuming")] == ["resuming from checkpoint-10 (step 10 of 20)"]
    assert same(load_file(out / "adapter_model.safetensors"), reference)


def test_another_runs_checkpoints_are_refused(assets, tmp_path):
    out = tmp_path / "run"
    train(assets, out, max_steps=10)
    with pytest.raises(ConfigError, match=r"cannot resume: .*run.json records another run's settings "
                                          r"\(training.learning_rate: 0.02 now, 0.01 in the folder\)"):
        train(assets, out, resume=True, learning_rate=2e-2)
    with pytest.raises(ConfigError, match=r"cannot resume: .*run.json records another run's settings "
                                          r"\(training.learning_rate: 0.02 now, 0.01 in the folder\)"):
        train(assets, out, max_steps=10, learning_rate=2e-2)  # the default, resume: auto, refuses it too
    with pytest.raises(ConfigError, match="training.resume: false, but training.output_dir .* already holds the "
                                          "checkpoints or adapter of an earlier run with these settings; remove "
                                          "training.resume: false to continue it, or set training.overwrite: true"):
        train(assets, out, max_steps=10, resume=False)
    with pytest.raises(ConfigError, match="of another run; use another training.output_dir, or set training.overwrite"):
        train(assets, out, max_steps=10, learning_rate=2e-2, resume=False)
    before = load_file(out / "checkpoint-10" / "adapter_model.safetensors")
    train(assets, out, max_steps=10, learning_rate=2e-2, overwrite=True)  # replaced, on request
    assert not same(load_file(out / "checkpoint-10" / "adapter_model.safetensors"), before)
    train(assets, out, max_steps=12, learning_rate=2e-2)  # the new run's own folder resumes (trained longer)


def test_a_folder_without_a_run_record_is_not_adopted(assets, tmp_path):
    out = tmp_path / "run"
    train(assets, out, max_steps=10)
    (out / "run.json").unlink()
    with pytest.raises(ConfigError, match="holds checkpoints or an adapter but no run.json"):
        train(assets, out, max_steps=10, resume=True)


def test_a_busy_folder_is_refused_before_the_model_loads(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(trainer_module, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    with folder_lock(out, "training run"), pytest.raises(FolderBusyError, match="in use by another training run"):
        train(assets, out)


def _race(folder, barrier, wins):
    barrier.wait()
    try:
        with folder_lock(folder):
            wins.put(1)
            time.sleep(0.5)
    except FolderBusyError:
        wins.put(0)


def test_only_one_of_many_racing_processes_holds_the_lock(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier, wins = context.Barrier(12), context.Queue()
    processes = [context.Process(target=_race, args=(tmp_path / "run", barrier, wins)) for _ in range(12)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
    assert sorted(wins.get(timeout=5) for _ in processes) == [0] * 11 + [1]


def test_a_non_finite_loss_stops_training_without_a_final_adapter(assets, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"training stopped at step \d+: .*not finite.*no final adapter"):
        train(assets, out, learning_rate=1e25)  # finite steps (1e38 overflows inside torch 2.7's Adam)
    assert not (out / "adapter_model.safetensors").exists()
    assert all(not path.name.startswith("checkpoint-") for path in out.iterdir())  # it diverged before step 10


def test_rows_with_nothing_left_to_learn_are_counted_or_refused(assets, tmp_path):
    from lily_ssm.data.commonsense import DataError, read_rows, tokenize_row
    from lily_ssm.models.loading import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer(assets["base"], dtype="float32")
    rows = read_rows(assets["train_file"])
    prompts = sorted(len(tokenize_row({**r, "output": ""}, tokenizer, 1000, add_eos=False, protocol="clean")
                         ["input_ids"]) for r in rows)
    cutoff = prompts[len(prompts) // 2]  # about half the responses are cut away entirely
    empty = sum(not any(label != -100 for label in tokenize_row(r, tokenizer, cutoff, False, protocol="clean")
                        ["labels"][1:]) for r in rows)
    assert 0 < empty < len(rows)
    lines: list[str] = []
    run_training(parse_config({**experiment(assets, tmp_path / "a", max_steps=2),
                               "data": {**experiment(assets, "")["data"], "cutoff_len": cutoff,
                                        "train_on_inputs": False}}), log=lines.append)
    assert f"warning: {empty} of {len(rows)} train rows have no response token left within data.cutoff_len=" \
           f"{cutoff} (train_on_inputs: false masks their prompt)" in "\n".join(lines)
    with pytest.raises(DataError, match="no response token left.*training would learn nothing"):
        run_training(parse_config({**experiment(assets, tmp_path / "b", max_steps=2),
                                   "data": {**experiment(assets, "")["data"], "cutoff_len": prompts[0] - 1,
                                            "train_on_inputs": False}}), log=lambda *_: None)


def test_the_log_is_not_written_through_a_planted_symlink(assets, tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere.txt"
    out.mkdir()
    elsewhere.write_text("precious\n")
    (out / "train_log.jsonl").symlink_to(elsewhere)
    with pytest.raises(OSError, match="train_log.jsonl is a symbolic link; refusing to write through it"):
        train(assets, out, max_steps=1)
    assert elsewhere.read_text() == "precious\n"

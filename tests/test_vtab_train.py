"""`lily-ssm vtab`: a tiny Vim trained on a generated VTAB-layout folder, resumable, with a summary table."""

from __future__ import annotations

from pathlib import Path

import pytest

from lily_ssm.cli import main as cli
from lily_ssm.config.vtab import load_vtab_config
from lily_ssm.data.vtab import write_fake_vtab
from lily_ssm.evaluation.vtab import summarize
from lily_ssm.train.vtab import run_vtab_task

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
    history = result["history"]
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
    assert "eurosat: resuming from checkpoint-2 (epoch 2 of 4)" in messages
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3, 4] and result["epochs"] == 4
    assert [p.name for p in (tmp_path / "eurosat").glob("checkpoint-*")] == ["checkpoint-4"]


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


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_a_kill_inside_a_checkpoint_resumes_from_the_last_whole_one(root, tmp_path, monkeypatch):
    """A checkpoint is one folder that appears in one rename: dying while writing epoch 2's optimizer
    state leaves epoch 1's checkpoint, and the resumed run ends exactly where an uninterrupted one does."""
    import torch

    from lily_ssm.train import vtab

    args = [f"data.root={root}", "training.epochs=3", "training.eval_every=3"]
    run_vtab_task(load_vtab_config(TINY, [*args, f"training.output_dir={tmp_path / 'ref'}"]), "eurosat",
                  log=lambda *_: None)
    out = tmp_path / "run"
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if ".checkpoint-2." in str(path):
            raise KeyboardInterrupt  # killed mid-checkpoint
        return real_save(obj, path, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(vtab.torch, "save", dying_save)
        with pytest.raises(KeyboardInterrupt):
            run_vtab_task(load_vtab_config(TINY, [*args, f"training.output_dir={out}"]), "eurosat", log=lambda *_: None)
    assert sorted(p.name for p in (out / "eurosat").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    messages: list[str] = []
    run_vtab_task(load_vtab_config(TINY, [*args, f"training.output_dir={out}"]), "eurosat", log=messages.append)
    assert "eurosat: resuming from checkpoint-1 (epoch 1 of 3)" in messages
    final, reference = _adapter(out / "eurosat"), _adapter(tmp_path / "ref" / "eurosat")
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_other_settings_and_non_finite_losses_are_refused(root, tmp_path):
    from lily_ssm.train.guards import TrainingDivergedError
    from lily_ssm.utils.lock import FolderBusyError, folder_lock
    from lily_ssm.utils.sections import ConfigError

    args = [f"data.root={root}", f"training.output_dir={tmp_path}", "training.epochs=1"]
    run_vtab_task(load_vtab_config(TINY, args), "eurosat", log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"eurosat/run.json records another run's settings "
                                          r"\(training.learning_rate: 0.001 now, 0.005 in the folder\)"):
        run_vtab_task(load_vtab_config(TINY, [*args, "training.learning_rate=1e-3"]), "eurosat", log=lambda *_: None)
    run_vtab_task(load_vtab_config(TINY, [*args, "training.learning_rate=1e-3", "training.overwrite=true"]),
                  "eurosat", log=lambda *_: None)
    with folder_lock(tmp_path / "eurosat"), pytest.raises(FolderBusyError):
        run_vtab_task(load_vtab_config(TINY, args), "eurosat", log=lambda *_: None)
    with pytest.raises(TrainingDivergedError, match="training stopped at step \\d+: eurosat: .*not finite"):
        run_vtab_task(load_vtab_config(TINY, [f"data.root={root}", f"training.output_dir={tmp_path / 'nan'}",
                                              "training.learning_rate=1e38"]), "eurosat", log=lambda *_: None)
    assert not (tmp_path / "nan" / "eurosat" / "adapter_model.safetensors").exists()

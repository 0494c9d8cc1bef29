"""The ablation grid: planning, one row per arm, resuming without re-running finished arms."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import language_assets

from lily_ssm.ablation import load_ablation, parse_ablation, plan_arms, run_ablation
from lily_ssm.cli import main as cli
from lily_ssm.data.vtab import write_fake_vtab
from lily_ssm.utils.sections import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return language_assets(tmp_path_factory.mktemp("ablation-assets"), train_per_task=6, test_per_task=2)


def language_config(assets, out, **ablation):
    return {
        "ablation": {"output_dir": str(out), "budget": 3000, "methods": ["lily", "lora"],
                     "target_sets": ["in", "in.x"], "lily": {"num_A": 2, "num_B": 2}, "workers": 2, **ablation},
        "model": {"name_or_path": assets["base"], "dtype": "float32"},
        "data": {"train_file": assets["train_file"], "cutoff_len": 64, "val_set_size": 0, "protocol": "clean"},
        "training": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 4, "learning_rate": 1e-2,
                     "warmup_steps": 0, "save_steps": 2, "logging_steps": 1, "progress_bar": False},
        "evaluation": {"data_root": assets["root"], "tasks": "boolq,piqa", "batch_size": 4, "max_new_tokens": 4},
    }


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_language_ablation_table_and_resume(assets, tmp_path):
    out = tmp_path / "abl"
    config = parse_ablation(language_config(assets, out))
    lines: list[str] = []
    summary = run_ablation(config, log=lines.append)
    names = ["lily-in-causal", "lora-in", "lily-in.x-causal", "lora-in.x"]
    assert not summary["failed"]
    rows = read_csv(out / "results.csv")
    assert [r["arm"] for r in rows] == names
    for row in rows:
        assert row["status"] == "finished" and 0 <= float(row["accuracy_pct"]) <= 100
        assert abs(float(row["budget_deviation_pct"])) <= 5 and int(row["parameters"]) > 0
        assert float(row["train_seconds"]) > 0 and float(row["peak_rss_mb"]) > 100
        assert {"acc_boolq", "acc_piqa"} <= set(row)
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 4
    assert "| lora-in.x | in_proj.x |" in (out / "summary.md").read_text()
    assert (out / "lily-in.x-causal" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "lily-in-causal" / "result.json").read_text())["spec"]["arm"]["name"] == names[0]

    # rerun: nothing is trained again
    stamps = {n: (out / n / "result.json").stat().st_mtime_ns for n in names}
    lines.clear()
    run_ablation(config, log=lines.append)
    assert [line for line in lines if line.startswith("rerun:")] == ["rerun: done, skipped: " + ", ".join(names)]
    assert not any("[1/" in line for line in lines)
    assert stamps == {n: (out / n / "result.json").stat().st_mtime_ns for n in names}

    # an unfinished arm runs again, alone
    (out / "lora-in" / "result.json").unlink()
    lines.clear()
    run_ablation(config, log=lines.append)
    assert [line for line in lines if line.startswith("rerun:")] == \
        ["rerun: done, skipped: lily-in-causal, lily-in.x-causal, lora-in.x; continuing: lora-in"]
    assert [line.split("]")[0] for line in lines if "[1/" in line] == ["lora-in  [1/1"]  # the one arm that ran
    assert read_csv(out / "results.csv")[1]["status"] == "finished"

    # new evaluation settings: every arm is evaluated again, none is trained again
    seconds = {row["arm"]: float(row["train_seconds"]) for row in read_csv(out / "results.csv")}
    raw = language_config(assets, out)
    raw["evaluation"]["max_new_tokens"] = 3
    lines.clear()
    run_ablation(parse_ablation(raw), log=lines.append)
    assert [line for line in lines if line.startswith("rerun:")] == ["rerun: evaluating again: " + ", ".join(names)]
    for name in names:
        result = json.loads((out / name / "result.json").read_text())
        assert result["spec"]["sections"]["evaluation"]["max_new_tokens"] == 3
        assert result["train_seconds"] == pytest.approx(seconds[name], abs=0.5)  # a resumed run trains 0 steps
        log = (out / name / "adapter" / "train_log.jsonl").read_text()
        assert '"step": 4' not in log  # never trained past max_steps

    # other training settings in the same folder are refused rather than mixed
    changed = parse_ablation(language_config(assets, out, budget=3500))
    with pytest.raises(ConfigError, match="written for other training settings"):
        run_ablation(changed, log=lines.append)


def test_vim_ablation_runs_each_arm_on_the_tasks(tmp_path):
    write_fake_vtab(tmp_path / "vtab", "eurosat", classes=3, per_class=2, image_size=16)
    raw = {
        "ablation": {"path": "vim", "output_dir": str(tmp_path / "abl"), "budget": 1500, "methods": ["lily", "lora"],
                     "target_sets": {"dt": ["dt_proj", "dt_proj_b"]}, "lily": {"num_A": 2, "num_B": 2},
                     "tasks": ["eurosat"], "workers": 1},
        "model": {"preset": "vim_tiny", "img_size": 16, "overrides": {"patch_size": 8, "embed_dim": 16, "depth": 2}},
        "data": {"root": str(tmp_path / "vtab"), "batch_size": 4},
        "training": {"epochs": 1, "warmup_epochs": 0, "eval_every": 1, "learning_rate": 1e-2},
    }
    summary = run_ablation(parse_ablation(raw), log=lambda *_: None)
    rows = summary["rows"]
    assert [r["arm"] for r in rows] == ["lily-dt-token", "lora-dt"]
    assert all(r["status"] == "finished" and "acc_eurosat" in r for r in rows)
    assert (tmp_path / "abl" / "lily-dt-token" / "eurosat" / "adapter_model.safetensors").is_file()


def test_shipped_tiny_config_plans_every_arm_within_five_percent():
    config = load_ablation(ROOT / "configs" / "ablation" / "tiny.yaml")
    from test_budget import tiny_mamba  # a tiny stand-in with the same target names: plan on it, not the cache

    arms = plan_arms(config, tiny_mamba("falcon", layers=4))
    assert len(arms) == 16 and all(abs(a.deviation) <= 0.05 for a in arms)


def die_or_finish(payload, show):
    """Stand-in arm process: the arm named ``lora-in`` dies without a word, the others finish."""
    import os

    from lily_ssm.utils.atomic import write_atomic

    if payload["arm"]["name"] == "lora-in":
        os._exit(9)
    write_atomic(f"{payload['folder']}/result.json", json.dumps({"status": "finished", "name": payload["arm"]["name"]}))


def test_a_dying_arm_process_fails_only_its_arm(tmp_path, monkeypatch):
    from lily_ssm.ablation import runner

    payloads = [{"arm": {"name": n}, "folder": str(tmp_path / n), "workers": 2}
                for n in ("lily-in-causal", "lora-in", "lora-in.x")]
    for payload in payloads:
        (tmp_path / payload["arm"]["name"]).mkdir()
    monkeypatch.setattr(runner, "run_arm_process", die_or_finish)
    outcomes = dict(runner._run_processes(payloads, workers=2))
    assert outcomes["lily-in-causal"] == {"status": "finished", "name": "lily-in-causal"}
    assert outcomes["lora-in.x"]["status"] == "finished"
    assert outcomes["lora-in"]["status"] == "failed" and "exited with code 9" in outcomes["lora-in"]["error"]


def test_missing_data_and_a_busy_folder_stop_before_training(assets, tmp_path):
    missing = language_config(assets, tmp_path / "a")
    missing["evaluation"]["data_root"] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere/boolq/test.json is missing"):
        run_ablation(parse_ablation(missing), log=lambda *_: None)
    assert not (tmp_path / "a").exists()

    from lily_ssm.utils.lock import FolderBusyError, folder_lock

    busy = tmp_path / "b"
    with folder_lock(busy, "lily-ssm ablate"), pytest.raises(FolderBusyError, match="in use by another lily-ssm"):
        run_ablation(parse_ablation(language_config(assets, busy)), log=lambda *_: None)
    (busy / ".lock").write_text("12345\n")  # a lock file left by a dead process holds nothing
    run_ablation(parse_ablation(language_config(assets, busy, methods=["lora"], target_sets=["in"])),
                 log=lambda *_: None)


def test_an_arm_that_saved_nothing_may_rerun_with_new_training_settings(assets, tmp_path):
    from lily_ssm.ablation import runner

    config = parse_ablation(language_config(assets, tmp_path, target_sets=["in"], methods=["lora"]))
    arm = plan_arms(config)[0]
    folder = tmp_path / arm.name
    folder.mkdir()
    (folder / "arm.json").write_text(json.dumps({"spec": {**runner.arm_spec(config, arm), "tasks": ["x"]}}))
    runner._check_reuse(folder, runner.arm_spec(config, arm), "cfg")  # nothing saved yet: allowed
    (folder / "adapter" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(ConfigError, match="other training settings"):
        runner._check_reuse(folder, runner.arm_spec(config, arm), "cfg")


def test_method_settings_merge_over_the_defaults(assets, tmp_path):
    raw = language_config(assets, tmp_path)
    raw["ablation"]["lily"] = {"router": "global"}
    config = parse_ablation(raw)
    assert config.ablation.lily == {"num_A": 4, "num_B": 4, "router": "global"}
    raw["ablation"]["lily"] = {"num_B": 1}
    raw["ablation"]["routing"] = ["causal", "sequence"]
    with pytest.raises(ConfigError, match="num_B=1: without several B experts there is no router"):
        parse_ablation(raw)


def test_config_errors_name_the_key(assets, tmp_path):
    raw = language_config(assets, tmp_path)
    with pytest.raises(ConfigError, match="unknown preset.*nope; presets for language: in, dt"):
        parse_ablation({**raw, "ablation": {**raw["ablation"], "target_sets": ["in", "nope"]}}).target_sets()
    with pytest.raises(ConfigError, match="training.output_dir is not an ablation setting: each arm.s folder is set"):
        parse_ablation({**raw, "training": {**raw["training"], "output_dir": "x"}})
    with pytest.raises(ConfigError, match=r"ablation.lily=.*r are set per arm"):
        parse_ablation({**raw, "ablation": {**raw["ablation"], "lily": {"r": 4}}})
    with pytest.raises(ConfigError, match="no 'adapter' section"):
        parse_ablation({**raw, "adapter": {}})
    with pytest.raises(ConfigError, match="'../x': a name becomes a folder name"):
        parse_ablation({**raw, "ablation": {**raw["ablation"], "target_sets": {"../x": ["in_proj"]}}}).target_sets()
    with pytest.raises(ConfigError, match="the Vim path needs a list of VTAB tasks"):
        parse_ablation({**raw, "ablation": {**raw["ablation"], "path": "vim"}})


def test_cli_dry_run_and_unreachable_budget(assets, tmp_path, capsys):
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(language_config(assets, tmp_path / "out")))
    assert cli(["ablate", str(path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "4 arms at a budget of 3,000" in printed and "lora-in.x" in printed
    assert not (tmp_path / "out").exists()
    tight = ["--set", "ablation.budget=7", "--set", "ablation.tolerance=0.01"]
    assert cli(["ablate", str(path), "--dry-run", *tight]) == 2
    err = capsys.readouterr().err
    assert "cannot be sized to the budget" in err and "lora-in:" in err and "nearest" in err


@pytest.mark.parametrize("name", ["tiny.yaml", "falcon-mamba-7b.yaml", "vim_s.yaml"])
def test_shipped_ablation_configs_parse(name):
    config = load_ablation(ROOT / "configs" / "ablation" / name)
    assert len(config.target_sets()) == 8 and config.ablation.methods == ["lily", "lora"]


def test_a_mamba2_base_gets_the_mamba2_presets(tmp_path):
    from conftest import tiny_family

    tiny_family("mamba2").save_pretrained(tmp_path / "mamba2")
    raw = {"ablation": {"output_dir": str(tmp_path / "out"), "budget": 6000, "methods": ["lily", "lora"]},
           "model": {"name_or_path": str(tmp_path / "mamba2")}, "data": {"train_file": "unused.json"},
           "training": {}, "evaluation": {"data_root": "unused"}}
    arms = plan_arms(parse_ablation(raw))
    assert {arm.target_set for arm in arms} == {"in", "out_proj", "in.z", "in.x", "in.B", "in.C", "in.dt", "all"}
    assert all(abs(arm.deviation) <= 0.05 for arm in arms)
    raw["ablation"]["target_sets"] = ["in", "dt"]  # Mamba-1's Δ preset: a Mamba-2 mixer has no dt_proj
    with pytest.raises(ConfigError, match="unknown preset\\(s\\) dt; presets for language-mamba2: in, out_proj"):
        plan_arms(parse_ablation(raw))

"""What ``lily-ssm ablate`` shows: one progress line per arm and its score, nothing from the arms'
processes (that goes to each arm's log.txt); a Ctrl-C stops every arm with one line and exit code 130,
and the same command then continues the unfinished arms."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import language_assets

from lily_ssm.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "ablation" / "tiny.yaml"
ARMS = ("lily-in-causal", "lora-in")
NOISE = ("Traceback", "Exception ignored", "Map:", "Loading weights", "{'loss'", "warning", "%|")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return language_assets(tmp_path_factory.mktemp("console-assets"), train_per_task=4, test_per_task=1)


def tiny_ablation(assets, out, steps):
    """The shipped tiny config cut to two arms (lily and LoRA on in_proj), ``steps`` steps, one task."""
    sets = {"ablation.output_dir": out, "ablation.methods": "[lily,lora]", "ablation.target_sets": "[in]",
            "ablation.budget": 3000, "ablation.workers": 2, "model.name_or_path": assets["base"],
            "data.train_file": assets["train_file"], "evaluation.data_root": assets["root"],
            "evaluation.tasks": "boolq", "evaluation.limit": 1, "training.max_steps": steps,
            "training.save_steps": 2, "training.logging_steps": 2, "training.warmup_steps": 0,
            "training.batch_size": 4, "training.micro_batch_size": 4, "training.learning_rate": 1e-2}
    return ["ablate", str(TINY)] + [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def arm_lines(text):
    return [line for line in text.splitlines() if line.startswith(ARMS)]


def test_parallel_ablate_shows_one_line_per_arm_and_no_worker_output(assets, tmp_path, capfd):
    out = tmp_path / "abl"
    assert cli(tiny_ablation(assets, out, steps=2)) == 0
    captured = capfd.readouterr()
    assert captured.err == ""
    assert not [noise for noise in NOISE if noise in captured.out]
    lines = arm_lines(captured.out)
    for arm in ARMS:
        mine = [line for line in lines if line.startswith(arm + " ")]
        assert any(re.search(r" 2/2 \[##########\]  loss \S+  lr \S+", line) for line in mine), mine
        assert re.search(r"\[\d/2\] \d+\.\d% accuracy, \d+s training", mine[-1]), mine
        log = (out / arm / "log.txt").read_text()
        assert "Map" in log and "train  2/2 [##########]" in log  # what the console did not show is in the log


def _ablate(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.Popen([sys.executable, "-m", "lily_ssm.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow  # two runs of the command in fresh interpreters: about a minute on two busy cores
def test_ctrl_c_stops_every_arm_with_one_line_and_the_rerun_continues(assets, tmp_path):
    out = tmp_path / "abl"
    args = tiny_ablation(assets, out, steps=40)
    process = _ablate(args, tmp_path)
    seen = ""
    while not all(re.search(rf"^{arm} +4/40 \[", seen, re.M) for arm in ARMS):  # checkpoint-2 is complete
        line = process.stdout.readline()
        assert line, f"ablate ended before any progress: {process.stderr.read()}"
        seen += line
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.splitlines() == ["lily-ssm ablate: interrupted: 2 arm(s) unfinished; rerun the same command to "
                                "continue them"]
    assert not [noise for noise in NOISE if noise in seen + rest]
    for arm in ARMS:
        assert "Traceback" not in (out / arm / "log.txt").read_text()
        assert not (out / arm / "result.json").exists()

    process = _ablate(args, tmp_path)  # the same command again
    stdout, err = process.communicate(timeout=300)
    assert process.returncode == 0 and err == "", err
    assert "rerun: continuing: lily-in-causal, lora-in" in stdout.splitlines()
    assert not [noise for noise in NOISE if noise in stdout]
    assert all((out / arm / "result.json").is_file() for arm in ARMS)
    for arm in ARMS:  # each continued from its own checkpoint
        starts = [json.loads(line) for line in (out / arm / "adapter" / "train_log.jsonl").read_text().splitlines()
                  if '"run_start"' in line]
        assert len(starts) == 2 and re.search(r"checkpoint-\d+$", starts[1]["resume_from"] or ""), starts

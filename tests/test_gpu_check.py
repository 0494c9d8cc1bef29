"""The GPU check's pieces run anywhere: gpu_check.sh parses, and the train-step benchmark runs tiny on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "eval" / "gpu_check.sh")]).returncode == 0


def test_gpu_step_benchmark_runs_tiny_on_a_cpu(tmp_path):
    """Training arms against the peer, the projection and decoding, at tiny sizes on a CPU."""
    done = subprocess.run([sys.executable, str(ROOT / "eval" / "bench" / "gpu_step.py"), "--device", "cpu",
                           "--out", str(tmp_path), "--layers", "2", "--hidden", "32", "--inner", "64", "--dt-rank", "4",
                           "--vocab", "64", "--shapes", "2x16", "--steps", "1", "--warmup", "0",
                           "--arms", "lily-in,lily-dt-in,peft-lora-in", "--profile", "--decode", "--decode-batch", "2",
                           "--decode-prompt", "6", "--decode-new", "3", "--decode-repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "gpu_step.json").read_text())
    train = {arm: r["shapes"]["2x16"] for arm, r in results["train"].items()}
    assert set(train) == {"lily-in", "lily-dt-in", "peft-lora-in"}
    assert all(r["tokens_per_s"] > 0 for r in train.values()), train
    assert results["train"]["lily-dt-in"]["trainable"] > results["train"]["lily-in"]["trainable"]
    profile = train["lily-in"]["profile"]
    assert profile["aten_ops"] > 0 and "AdaptedLinear.forward" in profile["regions_ms"]
    assert set(results["decode"]) == {"lily", "lora", "peft-lora", "stock", "lily-graphed"}
    assert all(r["new_tokens_per_s"] > 0 for r in results["decode"].values()), results["decode"]
    report = (tmp_path / "gpu_step.md").read_text()
    assert "| lily-ssm Lily, in_proj | 2x16 |" in report and "Projected epoch" in report and "Cached decoding" in report

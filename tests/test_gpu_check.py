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
    done = subprocess.run([sys.executable, str(ROOT / "eval" / "bench" / "gpu_step.py"), "--device", "cpu",
                           "--out", str(tmp_path), "--layers", "2", "--hidden", "32", "--inner", "64", "--dt-rank", "4",
                           "--vocab", "64", "--batch", "2", "--tokens", "16", "--steps", "1", "--warmup", "0",
                           "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "gpu_step.json").read_text())["results"]
    assert set(results) == {"lily-in", "lily-dt-in", "peft-lily-in"}
    assert all(r.get("tokens_per_s", 0) > 0 for r in results.values()), results
    assert results["lily-dt-in"]["trainable"] > results["lily-in"]["trainable"]
    assert "| lily-ssm Lily, in_proj |" in (tmp_path / "gpu_step.md").read_text()

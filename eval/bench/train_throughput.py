"""Training throughput of the tiny commonsense configs through `lily-ssm train`'s code path:
Lily (configs/tiny/lily_dt_in.yaml) vs LoRA (configs/tiny/lora_dt_in.yaml, the named peer), same
targets (in_proj + dt_proj), same data, same steps.

    python eval/bench/train_throughput.py [--steps 200] [--threads 2]

Tokens/s is the median of the trainer's logged windows (non-padding tokens), after the first window.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "tiny"
ARMS = {"lily": CONFIGS / "lily_dt_in.yaml", "lora": CONFIGS / "lora_dt_in.yaml"}


def worker(spec: dict) -> None:
    from lily_ssm.config.experiment import load_config
    from lily_ssm.train.trainer import LOG_NAME, run_training
    from lily_ssm.tuners.report import parameter_report

    with tempfile.TemporaryDirectory() as out:
        config = load_config(ARMS[spec["arm"]], [f"training.max_steps={spec['steps']}", f"training.output_dir={out}",
                                                 "training.logging_steps=20", "training.save_steps=100000",
                                                 "training.eval_steps=100000", "training.progress_bar=false"])
        result = run_training(config, log=lambda *_: None)
        rows = [json.loads(line) for line in (Path(out) / LOG_NAME).read_text().splitlines()]
    rates = [row["tokens_per_second"] for row in rows if "tokens_per_second" in row][1:]
    common.emit({"tokens_per_second": statistics.median(rates), "windows": len(rates),
                 "trainable": parameter_report(result["model"]).adapter_total,
                 "final_loss": [row["loss"] for row in rows if "loss" in row][-1]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results = {}
    for arm in ARMS:
        print(f"  training {arm} for {args.steps} steps ...", file=sys.stderr, flush=True)
        results[arm] = common.run_arm(__file__, {"arm": arm, "steps": args.steps}, args.threads)
        if "error" in results[arm]:
            print(f"  {arm}: {results[arm]['error']}", file=sys.stderr)
    rows = [[arm, f"{r.get('trainable', 0):,}", f"{r.get('tokens_per_second', 0):,.0f}", r.get("windows", "-"),
             f"{r.get('final_loss', float('nan')):.3f}", common.ratio(r, results["lora"], "tokens_per_second")]
            for arm, r in results.items()]
    print(f"\ntiny config training throughput, {args.steps} steps, {args.threads} threads (peer: LoRA)")
    common.print_table(["arm", "trainable", "tokens/s", "windows", "final loss", "tokens/s vs peer"], rows)


if __name__ == "__main__":
    spec = common.worker_spec()
    worker(spec) if spec else main()

"""The built-in default job: the whole commonsense pipeline on a tiny model, offline, on a CPU.

1. a tiny Falcon-Mamba-architecture base and word-level tokenizer, pre-trained briefly on a generated
   corpus that teaches the answer format but not the tasks (cached, built once);
2. generated data in the eight tasks' formats, with held-out test items;
3. the untuned base scored by the commonsense evaluator;
4. Lily fine-tuned through the same trainer as ``lily-ssm train``;
5. the tuned model scored by the same evaluator, a before/after table, the adapter, the results and
   a plot of the router weights per layer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .analysis.figures import plot_router_weights
from .analysis.routing import record_router_weights, router_matrix
from .config.experiment import parse_config
from .data.commonsense import BUILTIN_SIZES
from .data.synthetic import write_synthetic_commonsense
from .evaluation.commonsense import evaluate_commonsense, markdown_table
from .models.loading import BUILTIN_PREFIX, load_model_and_tokenizer
from .train.trainer import run_training
from .utils.atomic import write_atomic

BASE_MODEL = BUILTIN_PREFIX + "tiny-falcon-mamba"

# The quickstart's experiment: configs/tiny/lily_dt_in.yaml with its data and saving adapted to the quickstart.
EXPERIMENT: dict[str, Any] = {
    "model": {"name_or_path": BASE_MODEL, "dtype": "float32"},
    "adapter": {"method": "lily", "targets": ["in_proj", "dt_proj"], "r": 16, "num_A": 2, "num_B": 4,
                "scaling": 1.0, "routing": "causal", "overrides": {"dt_proj": {"r": 4, "num_B": 1}}},
    "data": {"train_file": "builtin:synthetic-commonsense", "cutoff_len": 128, "val_set_size": 0,
             "train_on_inputs": False, "protocol": "clean"},
    "training": {"output_dir": "lily-quickstart/adapter", "epochs": 1.0, "max_steps": 800, "batch_size": 8,
                 "micro_batch_size": 8, "learning_rate": 2.0e-2, "warmup_steps": 20, "lr_scheduler": "linear",
                 "save_steps": 400, "save_total_limit": 1, "logging_steps": 50, "seed": 0,
                 "overwrite": True},  # each quickstart starts over in its own folder
}
# The tiny word-level tokenizer lowercases and drops spaces, so the paper protocol's split on "### Response:"
# cannot be applied to its decoded text: the quickstart uses the clean protocol, greedy.
EVAL = {"batch_size": 32, "num_beams": 1, "max_new_tokens": 8, "protocol": "clean"}
REDUCED = {"max_steps": 20, "train_per_task": 20, "test_per_task": 4, "base_steps": 5}


def run_quickstart(out_dir: str | Path = "lily-quickstart", reduced: bool = False, log: Any = print) -> dict[str, Any]:
    """Run the quickstart into ``out_dir``; ``reduced=True`` is a seconds-long smoke version (tests)."""
    start = time.perf_counter()
    out = Path(out_dir)
    experiment = json.loads(json.dumps(EXPERIMENT))
    data_sizes = dict(BUILTIN_SIZES)
    if reduced:
        experiment["training"].update(max_steps=REDUCED["max_steps"], save_steps=10, logging_steps=5)
        data_sizes.update(train_per_task=REDUCED["train_per_task"], test_per_task=REDUCED["test_per_task"])
        experiment["model"]["name_or_path"] = str(_reduced_base(out / "reduced-base", log))

    log("== 1/5 base model")
    model_path = experiment["model"]["name_or_path"]
    model, tokenizer = load_model_and_tokenizer(model_path, dtype="float32")

    log("== 2/5 data")
    data = write_synthetic_commonsense(out / "data", **data_sizes)
    experiment["data"]["train_file"] = data["train_file"]
    experiment["training"]["output_dir"] = str(out / "adapter")
    log(f"{data['train_items']} training items, {sum(data['test_items'].values())} held-out test items in "
        f"{data['root']}")

    log("== 3/5 untuned base on the held-out items")
    before = evaluate_commonsense(model, tokenizer, data["root"], output_dir=out / "eval-untuned", log=log, **EVAL)
    del model

    log("== 4/5 Lily fine-tuning")
    config = parse_config(experiment, source="quickstart")
    trained = run_training(config, log=log)
    tuned = trained["model"]

    log("== 5/5 tuned model on the held-out items")
    with record_router_weights(tuned) as recorder:
        after = evaluate_commonsense(tuned, tokenizer, data["root"], output_dir=out / "eval-lily", log=log, **EVAL)
    plot = plot_router_weights(router_matrix(tuned, recorder), out / "router_weights.png",
                               title="mean router weights on the held-out items")

    seconds = time.perf_counter() - start
    table = markdown_table({"untuned": before, "Lily": after})
    summary = {"untuned": before, "lily": after, "gain_points": 100 * (after["average"] - before["average"]),
               "seconds": round(seconds, 1), "adapter": trained["adapter"], "router_plot": str(plot),
               "train_metrics": trained["metrics"], "experiment": config.to_dict(), "data": data}
    write_atomic(out / "results.json", json.dumps(summary, indent=2, default=str) + "\n")
    write_atomic(out / "results.md", table)
    log("\n" + table)
    log(f"average accuracy {100 * before['average']:.1f}% -> {100 * after['average']:.1f}% "
        f"({summary['gain_points']:+.1f} points) in {seconds:.0f}s")
    log(f"adapter: {trained['adapter']}  results: {out / 'results.json'}  router plot: {plot}")
    return summary


def _reduced_base(folder: Path, log: Any) -> Path:
    from .models.tiny import build_quickstart_base

    return build_quickstart_base(folder, log=log, steps=REDUCED["base_steps"], corpus_size=64)

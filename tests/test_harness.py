"""The lm-evaluation-harness bridge: the `lily` backend, the offline task files, the CLI hand-over."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from conftest import randomise_adapter  # noqa: E402

import lily_ssm  # noqa: E402
from lily_ssm.cli import main as cli  # noqa: E402
from lily_ssm.data.synthetic import write_synthetic_commonsense  # noqa: E402
from lily_ssm.evaluation.harness import LilyLM  # noqa: E402
from lily_ssm.models.loading import load_model_and_tokenizer  # noqa: E402
from lily_ssm.models.tiny import build_quickstart_base  # noqa: E402

EVAL_DIR = Path(__file__).resolve().parents[1] / "eval"
TASKS_DIR = EVAL_DIR / "lm_eval_tasks"
sys.path.insert(0, str(EVAL_DIR))
from convert_llm_adapters import convert  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    base = build_quickstart_base(root / "base", log=lambda *_: None, steps=2, corpus_size=32, hidden=32, layers=2)
    data = write_synthetic_commonsense(root / "data", train_per_task=2, test_per_task=6)
    convert(data["root"], root / "jsonl")
    adapters = {}
    for name, std in (("zero", None), ("random", 0.5)):
        model, _ = load_model_and_tokenizer(str(base), dtype="float32")
        lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj", "dt_proj"], r=4, num_A=1, num_B=3))
        if std:
            randomise_adapter(model, std=std)
        adapters[name] = str(lily_ssm.save_adapter(model, root / f"adapter-{name}"))
    return {"base": str(base), "jsonl": root / "jsonl", **adapters}


@pytest.fixture(autouse=True)
def _offline_data(assets, monkeypatch):
    monkeypatch.setenv("LILY_SSM_LM_EVAL_DATA", str(assets["jsonl"]))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def loglikelihoods(lm, tasks=("piqa_local", "winogrande_local")):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                  log_samples=True, bootstrap_iters=0)
    return {task: [[r[0][0] for r in sample["resps"]] for sample in out["samples"][task]] for task in tasks}


def close(a, b, tol=1e-4):
    return all(abs(x - y) <= tol for task in a for sa, sb in zip(a[task], b[task]) for x, y in zip(sa, sb))


def test_zero_adapter_matches_hf_backend_and_trained_adapter_differs(assets):
    from lm_eval.models.huggingface import HFLM

    reference = loglikelihoods(HFLM(pretrained=assets["base"], dtype="float32", batch_size=4, device="cpu"))
    zero = loglikelihoods(LilyLM(pretrained=assets["base"], adapter=assets["zero"], dtype="float32", batch_size=4))
    assert close(zero, reference)
    random = loglikelihoods(LilyLM(pretrained=assets["base"], adapter=assets["random"], dtype="float32",
                                   batch_size=4))
    assert not close(random, reference, tol=1e-3)


@pytest.mark.parametrize("routing", ["sequence", "batch"])
def test_scoring_refuses_routing_that_pools_over_the_continuation(assets, tmp_path, routing):
    """A loglikelihood forward holds context and continuation: sequence / batch mixes would include the
    answer being scored. Generation is unaffected; allow_lookahead=True scores anyway."""
    model, _ = load_model_and_tokenizer(assets["base"], dtype="float32")
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj"], r=4, num_A=1, num_B=3, routing=routing))
    adapter = str(lily_ssm.save_adapter(model, tmp_path / routing))
    with pytest.raises(ValueError, match=f"routing='{routing}'.*steer its own score"):
        loglikelihoods(LilyLM(pretrained=assets["base"], adapter=adapter, dtype="float32", batch_size=4),
                       tasks=("piqa_local",))
    if routing == "sequence":  # the opt-in scores (once is enough: the check is the same for both modes)
        loglikelihoods(LilyLM(pretrained=assets["base"], adapter=adapter, dtype="float32", batch_size=4,
                              allow_lookahead=True), tasks=("piqa_local",))


def test_results_do_not_depend_on_batch_size(assets):
    runs = [loglikelihoods(LilyLM(pretrained=assets["base"], adapter=assets["random"], dtype="float32",
                                  batch_size=size)) for size in (1, 8)]
    assert close(runs[0], runs[1], tol=1e-5)


def test_cli_runs_a_local_task_and_writes_results(assets, tmp_path):
    code = cli(["lm-eval", "--model", "lily", "--model_args",
                f"pretrained={assets['base']},adapter={assets['random']},dtype=float32",
                "--tasks", "boolq_local", "--include_path", str(TASKS_DIR), "--output_path", str(tmp_path / "out"),
                "--batch_size", "4", "--device", "cpu"])
    assert code == 0
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())["results"]
    assert 0.0 <= results["boolq_local"]["acc,none"] <= 1.0


def test_bad_adapters_are_clear_errors(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter folder .*nope does not exist"):
        LilyLM(pretrained=assets["base"], adapter=str(tmp_path / "nope"))
    other = build_quickstart_base(tmp_path / "other", log=lambda *_: None, steps=1, corpus_size=32, hidden=16,
                                  layers=2)
    with pytest.raises(lily_ssm.AdapterLoadError, match="different base model"):
        LilyLM(pretrained=str(other), adapter=assets["random"], dtype="float32")


def test_adapter_argument_is_loaded_onto_an_already_adapted_model(assets):
    model, tokenizer = load_model_and_tokenizer(assets["base"], dtype="float32")
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj", "dt_proj"], r=4, num_A=1, num_B=3))
    lm = LilyLM(pretrained=model, tokenizer=tokenizer, adapter=assets["random"], batch_size=2)
    assert lm.model.lily_ssm_adapter.pools["in_proj"].B.abs().sum() > 0

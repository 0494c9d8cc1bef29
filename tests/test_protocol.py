"""The published commonsense protocol (``protocol: paper``) end to end: decoding defaults, where the
answer is read, the prompts recorded per prediction, left padding and best-checkpoint selection in
training, and the protocol an adapter was trained with carried to its evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import byte_level_falcon, language_assets

import lily_ssm
from lily_ssm.cli import main as cli
from lily_ssm.config.experiment import parse_config
from lily_ssm.data.prompts import evaluation_prompt
from lily_ssm.data.synthetic import write_synthetic_commonsense
from lily_ssm.evaluation.commonsense import evaluate_commonsense
from lily_ssm.train.trainer import AdapterTrainer, run_training, training_collator


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_commonsense(tmp_path_factory.mktemp("data"), train_per_task=2, test_per_task=3)


def _scripted_generate(model, tokenizer, continuation: str, calls: list):
    """Make ``model.generate`` append ``continuation`` to every prompt, recording its keyword arguments."""
    extra = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]

    def generate(input_ids, **kwargs):
        calls.append(kwargs)
        return torch.cat([input_ids, extra.expand(input_ids.shape[0], -1)], dim=1)

    model.generate = generate


def test_paper_protocol_evaluates_as_the_published_evaluator(data, tmp_path):
    model, tokenizer = byte_level_falcon()
    calls: list = []
    _scripted_generate(model, tokenizer, "The correct answer is TRUE\n\n### Response:\nfalse", calls)
    results = evaluate_commonsense(model, tokenizer, data["root"], tasks="boolq", output_dir=tmp_path,
                                   log=lambda *_: None)
    assert {c["num_beams"] for c in calls} == {4} and {c["max_new_tokens"] for c in calls} == {32}
    assert results["settings"] == {"protocol": "paper", "batch_size": 16, "num_beams": 4, "max_new_tokens": 32,
                                   "limit": None}
    rows = [json.loads(line) for line in (tmp_path / "predictions" / "boolq.jsonl").read_text().splitlines()]
    test = json.loads((Path(data["root"]) / "boolq" / "test.json").read_text())
    for row, item in zip(rows, test):
        assert row["prompt"] == evaluation_prompt(item["instruction"], item["input"], "paper")  # exactly what ran
        assert row["response"] == "The correct answer is TRUE"  # cut at the second marker, stripped
        assert row["prediction"] == "TRUE" and row["correct"] == (item["answer"] == "true")
    assert results["tasks"]["boolq"]["correct"] == sum(item["answer"] == "true" for item in test)


def test_clean_protocol_reads_the_continuation_greedily(data, tmp_path):
    model, tokenizer = byte_level_falcon()
    calls: list = []
    _scripted_generate(model, tokenizer, "hmm ### Response: Solution2", calls)
    evaluate_commonsense(model, tokenizer, data["root"], tasks="piqa", protocol="clean", output_dir=tmp_path,
                         log=lambda *_: None)
    assert {c["num_beams"] for c in calls} == {1}
    row = json.loads((tmp_path / "predictions" / "piqa.jsonl").read_text().splitlines()[0])
    assert row["prediction"] == "Solution2" and row["prompt"].endswith("### Response:\n")


def test_evaluation_refuses_batch_routing_in_batches_and_bad_sizes(data):
    model, tokenizer = byte_level_falcon()
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj"], r=2, num_A=1, num_B=2, routing="batch"))
    with pytest.raises(ValueError, match="routing='batch'.*depend on the other 3 items.*batch size 1"):
        evaluate_commonsense(model, tokenizer, data["root"], tasks="boolq", batch_size=4, log=lambda *_: None)
    for name, kwargs in (("limit", {"limit": 0}), ("limit", {"limit": -1}), ("num_beams", {"num_beams": 0})):
        with pytest.raises(ValueError, match=f"{name}=-?[01]; must be a positive integer"):
            evaluate_commonsense(model, tokenizer, data["root"], tasks="boolq", batch_size=1, log=lambda *_: None,
                                 **kwargs)


def test_paper_training_pads_on_the_left():
    _, tokenizer = byte_level_falcon()
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    left = training_collator(tokenizer, "paper")([dict(r) for r in rows])
    assert left["input_ids"][1].tolist() == [0] * 7 + [8] and left["labels"][1].tolist() == [-100] * 7 + [8]
    right = training_collator(tokenizer, "clean")([dict(r) for r in rows])
    assert right["input_ids"][1].tolist() == [8] + [0] * 7


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return language_assets(tmp_path_factory.mktemp("assets"))


def _experiment(assets, out, protocol):
    return {"model": {"name_or_path": assets["base"], "dtype": "float32"},
            "adapter": {"method": "lily", "targets": ["in_proj"], "r": 4, "num_A": 1, "num_B": 2},
            "data": {"train_file": assets["train_file"], "cutoff_len": 96, "val_set_size": 8, "protocol": protocol},
            "training": {"output_dir": str(out), "max_steps": 30, "batch_size": 8, "micro_batch_size": 8,
                         "learning_rate": 1e-2, "warmup_steps": 0, "eval_steps": 10, "save_steps": 10,
                         "logging_steps": 10, "progress_bar": False}}


def test_paper_training_keeps_the_checkpoint_with_the_lowest_validation_loss(assets, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    losses = {10: 2.0, 20: 1.0, 30: 3.0}  # the validation loss at each evaluation: step 20 is the best
    monkeypatch.setattr(AdapterTrainer, "evaluate", lambda self, *a, **k: {"eval_loss": losses[self.state.global_step]})
    out = tmp_path / "run"
    run_training(parse_config(_experiment(assets, out, "paper")), log=lambda *_: None)
    final = load_file(out / "adapter_model.safetensors")
    best, last = (load_file(out / f"checkpoint-{n}" / "adapter_model.safetensors") for n in (20, 30))
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"best_checkpoint": str(out / "checkpoint-20"), "best_eval_loss": 1.0} in log

    raw = _experiment(assets, out, "paper")
    raw["training"].update(save_steps=15)
    with pytest.raises(lily_ssm.utils.sections.ConfigError, match="save_steps=15 must be a multiple of.*eval_steps=10"):
        run_training(parse_config(raw), log=lambda *_: None)


def test_eval_commonsense_uses_the_protocol_the_adapter_was_trained_with(assets, tmp_path, capsys):
    out = tmp_path / "run"
    raw = _experiment(assets, out, "clean")
    raw["training"].update(max_steps=2, save_steps=2, eval_steps=2)
    run_training(parse_config(raw), log=lambda *_: None)
    args = ["eval-commonsense", "--model", assets["base"], "--adapter", str(out), "--data-root", assets["root"],
            "--tasks", "boolq", "--limit", "1", "--max-new-tokens", "2"]
    assert cli(args) == 0
    assert f"protocol clean (the adapter's, from {out / 'experiment.yaml'})" in capsys.readouterr().out
    # asked for the paper protocol: a warning, then the tiny word tokenizer cannot give the marker back
    assert cli([*args, "--protocol", "paper"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("warning: the adapter was trained with protocol 'clean'") for line in err)
    assert err[-1].startswith("lily-ssm eval-commonsense: error: ") and err[-1].endswith("Use protocol clean")

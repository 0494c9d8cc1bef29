"""Prompt construction, answer extraction, data validation and experiment-config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lily_ssm.data.commonsense import DataError, read_rows, tokenize_row
from lily_ssm.data.prompts import TASKS, build_prompt, resolve_tasks
from lily_ssm.train.config import ConfigError, load_config

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def test_prompt_with_and_without_input():
    plain = build_prompt("Pick one.", "", "the correct answer is true")
    assert plain.startswith("Below is an instruction that describes a task. Write a response")
    assert "### Input:" not in plain
    assert plain.endswith("### Instruction:\nPick one.\n\n### Response:\nthe correct answer is true")
    with_input = build_prompt("Pick one.", "some context")
    assert "paired with an input that provides further context" in with_input
    assert "### Input:\nsome context\n\n### Response:\n" in with_input


def test_training_text_extends_the_evaluation_prompt():
    # the model is scored on exactly the text it was trained on, with the response left to generate
    for inp in ("", "ctx"):
        assert build_prompt("Q?", inp, "the correct answer is option2").startswith(build_prompt("Q?", inp))


@pytest.mark.parametrize("task,text,expected", [
    ("boolq", "the correct answer is TRUE", "true"),
    ("boolq", "false, no wait, true", "false"),
    ("boolq", "I am not sure", ""),
    ("piqa", "the correct answer is Solution2", "solution2"),
    ("social_i_qa", "answer3 or answer1", "answer3"),
    ("hellaswag", "the correct answer is ending4.", "ending4"),
    ("hellaswag", "the correct answer is ending5", ""),
    ("winogrande", "OPTION1", "option1"),
    ("ARC-Easy", "answer5", "answer5"),
    ("ARC-Challenge", "the correct answer is", ""),
    ("openbookqa", "answer2answer4", "answer2"),
])
def test_answer_extraction_first_match_any_case(task, text, expected):
    assert TASKS[task].extract(text) == expected


def test_task_names_are_checked():
    assert [t.name for t in resolve_tasks("boolq, piqa")] == ["boolq", "piqa"]
    assert len(resolve_tasks(None)) == 8
    with pytest.raises(ValueError, match="unknown task\\(s\\) siqa; known tasks: boolq, piqa, social_i_qa"):
        resolve_tasks("boolq,siqa")


def write(path, rows):
    path.write_text(json.dumps(rows) if not isinstance(rows, str) else rows)
    return path


GOOD = {"instruction": "Q?", "input": "", "output": "the correct answer is true", "answer": "true"}


@pytest.mark.parametrize("rows,message", [
    ([], "holds no rows"),
    ("", "holds no rows"),
    ({"a": 1}, "expected a JSON list of objects, got dict"),
    ([GOOD, ["x"]], "row 1 is a list"),
    ([GOOD, GOOD, {"instruction": "Q?"}], "row 2 has no 'output' field"),
    ([{**GOOD, "output": 3}], "row 0 field 'output' is a int"),
    ([{**GOOD, "input": ["x"]}], "row 0 field 'input' is a list"),
    ([{**GOOD, "instruction": "  "}], "row 0 has an empty 'instruction'"),
    ("[{", "not valid JSON"),
])
def test_bad_rows_name_file_and_row(tmp_path, rows, message):
    path = write(tmp_path / "bad.json", rows)
    with pytest.raises(DataError, match=message) as info:
        read_rows(path)
    assert str(path) in str(info.value)


def test_missing_file_and_jsonl(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_rows(tmp_path / "nope.json")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "input": None}) + "\n")
    rows = read_rows(path)
    assert len(rows) == 2 and rows[1]["input"] == ""


class CharTokenizer:
    """A minimal tokenizer stand-in: one id per character, EOS = 0."""

    eos_token_id = 0

    def __call__(self, text, truncation=True, max_length=None, add_special_tokens=True):
        ids = [ord(c) for c in text][: max_length if truncation else None]
        return {"input_ids": ids}


def test_loss_masking_of_the_prompt():
    tok = CharTokenizer()
    row = {"instruction": "Q?", "input": "", "output": "yes"}
    prompt_len = len(build_prompt("Q?", ""))
    masked = tokenize_row(row, tok, cutoff_len=1000, train_on_inputs=False)
    assert masked["labels"][:prompt_len] == [-100] * prompt_len
    assert masked["labels"][prompt_len:] == [ord("y"), ord("e"), ord("s"), 0]  # response + EOS learned
    full = tokenize_row(row, tok, cutoff_len=1000, train_on_inputs=True)
    assert full["labels"] == full["input_ids"] and full["input_ids"][-1] == 0
    cut = tokenize_row(row, tok, cutoff_len=20, train_on_inputs=False)
    assert len(cut["input_ids"]) == 20 and set(cut["labels"]) == {-100}  # no EOS when cut


CONFIG = """
model: {name_or_path: builtin:tiny-falcon-mamba}
adapter: {method: lily, targets: [in_proj], r: 4, num_A: 1, num_B: 2}
data: {train_file: data.json}
training: {output_dir: out}
"""


def config_file(tmp_path, text=CONFIG):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_config_loads_with_overrides(tmp_path):
    config = load_config(config_file(tmp_path), ["training.learning_rate=1e-4", "adapter.r=8", "data.cutoff_len=64"])
    assert config.training.learning_rate == 1e-4 and config.data.cutoff_len == 64
    assert config.adapter_config().r == 8


@pytest.mark.parametrize("text,overrides,message", [
    (CONFIG.replace("training: {output_dir: out}", "training: {output_dir: out, lr: 1}"), [],
     "unknown key\\(s\\) training.lr; valid keys in training: output_dir, epochs"),
    (CONFIG.replace("data: {train_file: data.json}", "data: {cutoff_len: 5}"), [],
     "missing required key\\(s\\) data.train_file"),
    (CONFIG.replace("r: 4", "r: four"), [], "r='four'"),
    (CONFIG.replace("method: lily", "method: dora"), [], "adapter method 'dora'; known methods: lily, lora"),
    (CONFIG + "extra: {}\n", [], "unknown section\\(s\\) extra"),
    (CONFIG, ["training.epochs=many"], "training.epochs='many' should be float"),
    (CONFIG, ["learning_rate=1"], "expected section.key=value"),
    (CONFIG, ["optim.lr=1"], "unknown section 'optim'"),
    ("model: [1, 2\n", [], "not valid YAML"),
])
def test_bad_configs_are_named(tmp_path, text, overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(config_file(tmp_path, text), overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS_DIR.rglob("*.yaml")
                                        if p.parent.name not in ("vim", "ablation")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert config.adapter_config().targets

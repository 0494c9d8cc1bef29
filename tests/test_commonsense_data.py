"""Prompt construction, answer extraction, data validation and experiment-config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lily_ssm.config.experiment import load_config
from lily_ssm.data.commonsense import DataError, read_rows, tokenize_row
from lily_ssm.data.prompts import (
    TASKS,
    evaluation_prompt,
    is_correct,
    resolve_tasks,
    response_text,
    training_prompt,
)
from lily_ssm.utils.sections import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


# The published scripts' prompts (LLM-Adapters finetune.py / commonsense_evaluate.py, the Lily authors'
# finetune_mamba.py / evaluate_mamba.py), written out literally: 16-space indents from the f-strings, blank
# lines of 16 spaces in the training template, empty ones in the evaluation template.
PAPER_TRAIN_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    "                ### Instruction:\n"
    "                Pick one.\n"
    "                \n"
    "                ### Response:\n"
    "                the correct answer is true"
)
PAPER_TRAIN_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                Pick one.\n"
    "                \n"
    "                ### Input:\n"
    "                some context\n"
    "                \n"
    "                ### Response:\n"
    "                the correct answer is true"
)
PAPER_EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                Pick one.\n"
    "\n"
    "                ### Response:\n"
    "                "
)
PAPER_EVAL_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "\n"
    "                ### Instruction:\n"
    "                Pick one.\n"
    "\n"
    "                ### Input:\n"
    "                some context\n"
    "\n"
    "                ### Response:\n"
    "                "
)


def test_paper_prompts_are_the_published_ones_byte_for_byte():
    answer = "the correct answer is true"
    assert training_prompt("Pick one.", "", answer) == PAPER_TRAIN_NO_INPUT
    assert training_prompt("Pick one.", "some context", answer) == PAPER_TRAIN_WITH_INPUT
    assert evaluation_prompt("Pick one.", "") == PAPER_EVAL_NO_INPUT
    assert evaluation_prompt("Pick one.", None) == PAPER_EVAL_NO_INPUT
    assert evaluation_prompt("Pick one.", "some context") == PAPER_EVAL_WITH_INPUT
    # the prompt whose tokens train_on_inputs=false masks: the training text with an empty response
    assert training_prompt("Pick one.", "") == PAPER_TRAIN_NO_INPUT.removesuffix(answer)
    assert training_prompt("Q {x} {input}", "").count("Q {x} {input}") == 1  # braces in the text stay


def test_clean_prompt_is_one_template_for_training_and_evaluation():
    plain = training_prompt("Pick one.", "", "the correct answer is true", protocol="clean")
    assert plain == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\nPick one.\n\n### Response:\nthe correct answer is true")
    with_input = evaluation_prompt("Pick one.", "some context", protocol="clean")
    assert "### Input:\nsome context\n\n### Response:\n" in with_input
    for inp in ("", "ctx"):  # scored on exactly the text it was trained on, the response left to generate
        assert training_prompt("Q?", inp, "option2", protocol="clean").startswith(
            evaluation_prompt("Q?", inp, protocol="clean"))
    with pytest.raises(ValueError, match="protocol='lily'; protocols: paper, clean"):
        training_prompt("Q?", protocol="lily")


@pytest.mark.parametrize("task,text,expected", [
    ("boolq", "the correct answer is TRUE", "TRUE"),  # as written; scoring lower-cases it
    ("boolq", "false, no wait, true", "false"),
    ("boolq", "I am not sure", ""),
    ("piqa", "the correct answer is Solution2", "Solution2"),
    ("social_i_qa", "answer3 or answer1", "answer3"),
    ("hellaswag", "the correct answer is ending4.", "ending4"),
    ("hellaswag", "the correct answer is ending5", ""),
    ("winogrande", "OPTION1", "OPTION1"),
    ("ARC-Easy", "answer5", "answer5"),
    ("ARC-Challenge", "the correct answer is", ""),
    ("openbookqa", "answer2answer4", "answer2"),
    ("piqa", "\u017folution1, no: solution2", "\u017folution1"),  # re.IGNORECASE matches the long s
    ("winogrande", "  OPTİON2 ", "OPTİON2"),  # ... and the dotted capital I
])
def test_answer_extraction_is_the_published_first_case_insensitive_match(task, text, expected):
    assert TASKS[task].extract(text) == expected


@pytest.mark.parametrize("answer,predicted,paper,clean", [
    ("true", "TRUE", True, True),
    ("solution2", "\u017folution1", False, False),
    ("option2", "OPTİON2", False, False),  # "OPTİON2".lower() is "opti̇on2": the published check says wrong
    (" true", "true", False, True),  # the published check compares the gold label as stored
    ("", "", True, True),
])
def test_scoring_rule(answer, predicted, paper, clean):
    assert is_correct(answer, predicted, "paper") is paper
    assert is_correct(answer, predicted, "clean") is clean


def test_paper_reads_the_answer_after_the_first_response_marker():
    decoded = PAPER_EVAL_NO_INPUT + "the correct answer is answer1\n\n### Response:\nanswer2"
    assert response_text(decoded, "unused", "paper") == "the correct answer is answer1"
    late = PAPER_EVAL_NO_INPUT + "hmm\n### Response: the correct answer is answer2"
    assert TASKS["ARC-Easy"].extract(response_text(late, "unused", "paper")) == ""  # cut at the second marker
    assert TASKS["ARC-Easy"].extract(response_text(late, "hmm ### Response: answer2", "clean")) == "answer2"
    with pytest.raises(ValueError, match="holds no '### Response:'.*Use protocol clean"):
        response_text("below is an instruction ### response : true", "true", "paper")


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


@pytest.mark.parametrize("protocol", ["paper", "clean"])
def test_loss_masking_of_the_prompt(protocol):
    tok = CharTokenizer()
    row = {"instruction": "Q?", "input": "", "output": "yes"}
    masked = tokenize_row(row, tok, cutoff_len=1000, train_on_inputs=False, protocol=protocol)
    prompt_len = len(training_prompt("Q?", "", protocol=protocol))
    assert masked["input_ids"][:-1] == [ord(c) for c in training_prompt("Q?", "", "yes", protocol=protocol)]
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
                                        if p.parent.name not in ("vim", "vit", "ablation")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert config.adapter_config().targets

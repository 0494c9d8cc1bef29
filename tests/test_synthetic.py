"""The quickstart's generated data (lily_ssm.data.synthetic) and tiny base model (lily_ssm.models.tiny)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from lily_ssm.data.prompts import TASKS, training_prompt
from lily_ssm.data.synthetic import (
    CATEGORY_OF,
    NUM_OPTIONS,
    SPECS,
    answer_choices,
    make_task_items,
    pretraining_corpus,
    vocabulary_texts,
    write_synthetic_commonsense,
)

FOLDERS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
EXPECTED_OPTIONS = {"boolq": 2, "piqa": 2, "social_i_qa": 3, "hellaswag": 4, "winogrande": 2, "ARC-Easy": 4,
                    "ARC-Challenge": 4, "openbookqa": 4}


def test_tasks_match_the_evaluators_task_list():
    assert set(NUM_OPTIONS) == set(TASKS) == set(FOLDERS)
    assert NUM_OPTIONS == EXPECTED_OPTIONS


@pytest.mark.parametrize("task", FOLDERS)
def test_items_have_the_llm_adapters_format(task):
    items = make_task_items(task, 24, seed=0)
    assert len(items) == 24
    choices = answer_choices(task)
    for item in items:
        assert set(item) == {"instruction", "input", "output", "answer"}
        assert item["input"] == ""
        assert item["output"] == f"the correct answer is {item['answer']}"
        assert item["answer"] in choices
        assert TASKS[task].extract(item["output"]) == item["answer"]
        assert item["instruction"].endswith("Answer format: " + "/".join(choices))
        if task != "boolq":
            labels = re.findall(rf"^{SPECS[task].label}(\d): ", item["instruction"], flags=re.M)
            assert labels == [str(i) for i in range(1, NUM_OPTIONS[task] + 1)]


@pytest.mark.parametrize("task", [t for t in FOLDERS if t != "boolq"])
def test_exactly_one_option_is_of_the_tasks_kind_and_it_is_the_answer(task):
    label = SPECS[task].label
    for item in make_task_items(task, 40, seed=3):
        options = re.findall(rf"^{label}(\d): .*?(\w+)(?: there)?\.?$", item["instruction"], flags=re.M)
        correct = [f"{label.lower()}{i}" for i, word in options if CATEGORY_OF[word] in SPECS[task].targets]
        assert correct == [item["answer"]]


def test_boolq_answer_is_whether_the_thing_is_of_the_kind():
    for item in make_task_items("boolq", 40, seed=3):
        thing = re.search(r"eat the (\w+)\?", item["instruction"]).group(1)
        assert (CATEGORY_OF[thing] in SPECS["boolq"].targets) == (item["answer"] == "true")


@pytest.mark.parametrize("task", FOLDERS)
def test_answer_positions_are_balanced(task):
    k = NUM_OPTIONS[task]
    counts = Counter(item["answer"] for item in make_task_items(task, 10 * k + 1, seed=5))
    assert set(counts) == set(answer_choices(task))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_items_are_distinct_deterministic_and_respect_exclude():
    items = make_task_items("ARC-Easy", 50, seed=1)
    assert len({i["instruction"] for i in items}) == 50
    assert items == make_task_items("ARC-Easy", 50, seed=1)
    excluded = {i["instruction"] for i in items[:25]}
    again = make_task_items("ARC-Easy", 50, seed=1, exclude=excluded)
    assert excluded.isdisjoint(i["instruction"] for i in again)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="'nope'"):
        make_task_items("nope", 3, seed=0)
    with pytest.raises(ValueError, match="n=-1"):
        make_task_items("piqa", -1, seed=0)
    with pytest.raises(ValueError, match="test_per_task=0"):
        write_synthetic_commonsense("unused", 3, 0)


def test_write_synthetic_commonsense_layout_and_disjointness(tmp_path):
    info = write_synthetic_commonsense(tmp_path, train_per_task=30, test_per_task=10, seed=2)
    train = json.loads((tmp_path / "commonsense_170k.json").read_text())
    assert info["train_file"] == str(tmp_path / "commonsense_170k.json")
    assert info["train_items"] == len(train) == 30 * 8
    assert {row["answer"] for row in train} >= {"true", "solution1", "answer3", "ending4", "option2"}
    assert len({row["instruction"].split(":")[0] for row in train[:40]}) > 1  # tasks are mixed
    train_text = {row["instruction"] for row in train}
    for task in FOLDERS:
        path = tmp_path / task / "test.json"
        assert info["test_files"][task] == str(path)
        test = json.loads(path.read_text())
        assert len(test) == info["test_items"][task] == 10
        assert train_text.isdisjoint(row["instruction"] for row in test)
        assert all(row["answer"] in answer_choices(task) for row in test)


def test_pretraining_corpus_has_format_valid_random_answers():
    corpus = pretraining_corpus(1200, seed=0)
    assert len(corpus) == 1200 and corpus == pretraining_corpus(1200, seed=0)
    header = training_prompt("", protocol="clean").split("###")[0]
    prompts = [text for text in corpus if text.startswith(header)]
    assert 600 <= len(prompts) < 1200  # the rest is general knowledge ("the pear is a kind of fruit.")
    by_format = {"/".join(answer_choices(t)): t for t in FOLDERS}
    answers, agree, piqa = Counter(), 0, 0
    for text in prompts:
        head, response = text.rsplit("\n\n### Response:\n", 1)
        task = by_format[head.rsplit("Answer format: ", 1)[1]]
        answer = TASKS[task].extract(response)
        assert response == f"the correct answer is {answer}" and answer in answer_choices(task)
        answers[answer] += 1
        if task == "piqa":  # the rule's answer: the tool
            options = re.findall(r"^Solution(\d): (\w+)$", head, flags=re.M)
            rule = next(f"solution{i}" for i, word in options if CATEGORY_OF[word] == "tool")
            piqa, agree = piqa + 1, agree + (rule == answer)
    assert len(answers) == 14  # true/false, solution1-2, answer1-4, ending1-4, option1-2
    assert piqa > 50 and 0.3 < agree / piqa < 0.7  # answers are not the rule's


def test_word_tokenizer_round_trips_answer_phrases():
    from lily_ssm.models.tiny import build_word_tokenizer

    tok = build_word_tokenizer(pretraining_corpus(40, seed=0) + vocabulary_texts())
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    for task in FOLDERS:
        for answer in answer_choices(task):
            ids = tok(f"the correct answer is {answer}")["input_ids"]
            assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
            text = tok.decode(ids, skip_special_tokens=True)
            assert text == f"the correct answer is {answer}"
            assert TASKS[task].extract(text) == answer
    item = make_task_items("hellaswag", 1, seed=9)[0]
    for protocol in ("paper", "clean"):  # the same words either way: the tokenizer drops spaces
        text = training_prompt(item["instruction"], "", item["output"], protocol=protocol)
        assert tok.unk_token_id not in tok(text)["input_ids"]
    with pytest.raises(ValueError, match="non-empty list"):
        build_word_tokenizer([])


def test_build_quickstart_base_saves_loadable_model_and_reuses_it(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lily_ssm.models.tiny import build_quickstart_base

    small = {"hidden": 16, "layers": 2, "state_size": 4, "corpus_size": 24, "steps": 2, "batch_size": 4}
    messages: list[str] = []
    folder = build_quickstart_base(tmp_path / "base", seed=0, log=messages.append, **small)
    assert folder == tmp_path / "base" and (folder / "quickstart_base.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no temporary folder left behind
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "FalconMambaForCausalLM"
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id
    enc = tok(["the correct answer is"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, enc["input_ids"].shape[1] + 2)

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    messages.clear()
    assert build_quickstart_base(folder, seed=0, log=messages.append, **small) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert any("using" in m for m in messages)
    with pytest.raises(TypeError, match="nope"):
        build_quickstart_base(folder, nope=1)

    build_quickstart_base(folder, seed=0, log=messages.append, **{**small, "steps": 3})  # other settings: rebuilt
    assert json.loads((folder / "quickstart_base.json").read_text())["settings"]["steps"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["base"]


def test_build_quickstart_base_refuses_a_foreign_folder(tmp_path):
    from lily_ssm.models.tiny import build_quickstart_base

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other"):
        build_quickstart_base(tmp_path / "other", log=lambda _: None, steps=1, corpus_size=8)

"""The offline lm-eval tasks (eval/lm_eval_tasks) and the LLM-Adapters converter, against lm-eval's
built-in tasks pointed at the same local documents."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import byte_level_falcon

lm_eval = pytest.importorskip("lm_eval")

EVAL_DIR = Path(__file__).resolve().parents[1] / "eval"
TASKS_DIR = EVAL_DIR / "lm_eval_tasks"
sys.path.insert(0, str(EVAL_DIR))
from convert_llm_adapters import convert, convert_row, main, split_instruction  # noqa: E402
from lm_eval_tasks import utils as task_utils  # noqa: E402

NAMES = {"boolq": "boolq", "piqa": "piqa", "social_i_qa": "social_iqa", "hellaswag": "hellaswag",
         "winogrande": "winogrande", "ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge",
         "openbookqa": "openbookqa"}
BUILTIN_YAML = {"boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml", "social_iqa": "siqa/siqa.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
                "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml"}
PARQUET = {"hellaswag", "arc_challenge"}  # these hub files are written as parquet, the rest as JSONL
LOSSLESS = ["piqa", "social_iqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]

_WIKIHOW_CTX = ("[header] How to unjam a vcr [title] Check to make sure it's plugged in. [step] If its still jammed, "
                "go to step 2 [title] Unplug the vcr. [title] Unscrew any screw that is holding the top on the unit.")
_WIKIHOW_ENDINGS = [
    "[title] Take the cover off [title] Stop and look at what you see. [title] Check to see if anything is inside "
    "that shouldn't be inside.",
    "[step] This is called a ductwork screw. Pop it out of the way and pull the top back.",
    "[step] Squeeze hard on the screw to release it. [title] Scoop up the film to find it.",
    "[step] You want to slide it off and set it aside if it can't be detached from the unit. [substeps] Lift or "
    "twist the unit away from the plug."]
_BOOLQ_PASSAGE = ("Property tax -- Property tax or 'house tax' is a local tax on buildings, along with appurtenant "
                  "land. It is and imposed on the Possessor (not the custodian of property as per 1978, 44th "
                  "amendment of constitution).")


def _arc(question, texts, labels, key, field="question"):
    return {"id": "x", field: question, "choices": {"text": texts, "label": labels}, "answerKey": key}


# Rows of the real LLM-Adapters test files, verbatim (one-line options; piqa's on separate lines), each with
# the hub-schema document it was made from.
REAL = {
    "boolq": [
        ("Please answer the following question with true or false, question: is house tax and property tax are "
         "same?\n\nAnswer format: true/false", "true",
         {"question": "is house tax and property tax are same", "passage": _BOOLQ_PASSAGE, "idx": 1, "label": 1})],
    "piqa": [
        ("Please choose the correct solution to the question: dresser\n\nSolution1: replace drawer with bobby pin "
         "\n\nSolution2: finish, woodgrain with  bobby pin \n\nAnswer format: solution1/solution2", "solution2",
         {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin ",
          "label": 1}),
        ("Please choose the correct solution to the question: chip clip\n\nSolution1:  can  be broken by a  board "
         "\n\nSolution2:  can  be broken by a  wash cloth \n\nAnswer format: solution1/solution2", "solution1",
         {"goal": "chip clip", "sol1": " can  be broken by a  board ", "sol2": " can  be broken by a  wash cloth ",
          "label": 0})],
    "social_i_qa": [
        ("Please choose the correct answer to the question: Tracy didn't go home that evening and resisted Riley's "
         "attacks. What does Tracy need to do before this?\n\nAnswer1: make a new plan Answer2: Go home and see "
         "Riley Answer3: Find somewhere to go\n\nAnswer format: answer1/answer2/answer3", "answer3",
         {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
          "question": "What does Tracy need to do before this?", "answerA": "make a new plan",
          "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3"})],
    "hellaswag": [
        ("Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is sitting "
         "on a roof. he\n\nEnding1: is using wrap to wrap a pair of skis. Ending2: is ripping level tiles off. "
         "Ending3: is holding a rubik's cube. Ending4: starts pulling up roofing on a roof.\n\nAnswer format: "
         "ending1/ending2/ending3/ending4", "ending4",
         {"ind": 4, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
          "ctx": "A man is sitting on a roof. he", "endings": [
              "is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
              "starts pulling up roofing on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val",
          "split_type": "indomain", "label": "3"}),
        ("Please choose the correct ending to complete the given sentence: Clean and jerk: A lady walks to a "
         "barbell. She bends down and grabs the pole. the lady\n\nEnding1: swings and lands in her arms. Ending2: "
         "pulls the barbell forward. Ending3: pulls a rope attached to the barbell. Ending4: stands and lifts the "
         "weight over her head.\n\nAnswer format: ending1/ending2/ending3/ending4", "ending4",
         {"ind": 8, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and "
          "grabs the pole.", "ctx_b": "the lady", "ctx": "A lady walks to a barbell. She bends down and grabs the "
          "pole. the lady", "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                                        "pulls a rope attached to the barbell.",
                                        "stands and lifts the weight over her head."],
          "source_id": "activitynet~v_-lJS58hyo1c", "split": "val", "split_type": "zeroshot", "label": "3"}),
        ("Please choose the correct ending to complete the given sentence: Computers and Electronics: "
         + _WIKIHOW_CTX + "\n\n" + " ".join(f"Ending{k}: {e}" for k, e in enumerate(_WIKIHOW_ENDINGS, 1))
         + "\n\nAnswer format: ending1/ending2/ending3/ending4", "ending1",
         {"ind": 5000, "activity_label": "Computers and Electronics", "ctx_a": _WIKIHOW_CTX, "ctx_b": "",
          "ctx": _WIKIHOW_CTX, "endings": _WIKIHOW_ENDINGS, "source_id": "wikihow~1", "split": "val",
          "split_type": "indomain", "label": "0"})],
    "winogrande": [
        ("Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a much "
         "better surgeon than Maria so _ always got the easier cases.\n\nOption1: Sarah Option2: Maria Answer "
         "format: option1/option2", "option2",
         {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
          "option1": "Sarah", "option2": "Maria", "answer": "2"}),
        ("Please choose the correct answer to fill in the blank to complete the given sentence: Eric went to "
         "Leslie's house to play with the new dog, but there was no answer. _ was at the park.\n\nOption1: Eric "
         "Option2: Leslie Answer format: option1/option2", "option2",
         {"sentence": "Eric went to Leslie's house to play with the new dog, but there was no answer. _ was at the "
          "park.", "option1": "Eric", "option2": "Leslie", "answer": "2"})],
    "ARC-Easy": [
        ("Please choose the correct answer to the question: A male puppy inherits traits from\n\nAnswer1: both "
         "parents Answer2: its mother, only Answer3: its father, only\n\nAnswer format: answer1/answer2/answer3",
         "answer1", _arc("A male puppy inherits traits from", ["both parents", "its mother, only",
                                                              "its father, only"], ["1", "2", "3"], "1")),
        ("Please choose the correct answer to the question: What gas in the air do we need to breathe in order to "
         "live?\n\nAnswer1: nitrogen Answer2: oxygen Answer3: carbon dioxide Answer4: hydrogen Answer5: water "
         "vapor\n\nAnswer format: answer1/answer2/answer3/answer4/answer5", "answer2",
         _arc("What gas in the air do we need to breathe in order to live?",
              ["nitrogen", "oxygen", "carbon dioxide", "hydrogen", "water vapor"], list("ABCDE"), "B"))],
    "ARC-Challenge": [
        ("Please choose the correct answer to the question: An astronomer observes that a planet rotates faster "
         "after a meteorite impact. Which is the most likely effect of this increase in rotation?\n\nAnswer1: "
         "Planetary density will decrease. Answer2: Planetary years will become longer. Answer3: Planetary days "
         "will become shorter. Answer4: Planetary gravity will become stronger.\n\nAnswer format: "
         "answer1/answer2/answer3/answer4", "answer3",
         _arc("An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
              "likely effect of this increase in rotation?",
              ["Planetary density will decrease.", "Planetary years will become longer.",
               "Planetary days will become shorter.", "Planetary gravity will become stronger."], list("ABCD"), "C")),
        ("Please choose the correct answer to the question: In the summer, the Sun shines directly on different "
         "places on Earth as Earth rotates. At about what time of day is the Sun highest in the summer sky in "
         "Maine?\n\nAnswer1: 6:00 A.M. Answer2: 10:00 A.M. Answer3: 1:00 P.M. Answer4: 3:00 P.M.\n\nAnswer format: "
         "answer1/answer2/answer3/answer4", "answer3",
         _arc("In the summer, the Sun shines directly on different places on Earth as Earth rotates. At about what "
              "time of day is the Sun highest in the summer sky in Maine?",
              ["6:00 A.M.", "10:00 A.M.", "1:00 P.M.", "3:00 P.M."], list("ABCD"), "C"))],
    "openbookqa": [
        ("Please choose the correct answer to the question: There is most likely going to be fog around:\n\n"
         "Answer1: a marsh Answer2: a tundra Answer3: the plains Answer4: a desert\n\nAnswer format: "
         "answer1/answer2/answer3/answer4", "answer1",
         _arc("There is most likely going to be fog around:", ["a marsh", "a tundra", "the plains", "a desert"],
              list("ABCD"), "A", field="question_stem")),
        ("Please choose the correct answer to the question: Owls are likely to hunt at\n\nAnswer1: 3pm Answer2: 2am "
         "Answer3: 6pm Answer4: 7am\n\nAnswer format: answer1/answer2/answer3/answer4", "answer2",
         _arc("Owls are likely to hunt at", ["3pm", "2am", "6pm", "7am"], list("ABCD"), " B",
              field="question_stem"))],
}


def _write(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(docs), path)
    else:
        path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return path


def _requests(tasks: dict) -> dict[str, list]:
    """``(doc_id, choice index, (context, continuation))`` of every request, per task."""
    out = {}
    for name, task in tasks.items():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        out[name] = [(inst.doc_id, inst.idx, inst.args) for inst in task.instances]
    return out


def _load_tasks(manager, names: list[str]) -> dict:
    """The task objects ``names`` name (``TaskManager.load`` from lm-eval 0.4.12, ``get_task_dict`` before)."""
    if hasattr(manager, "load"):
        return manager.load(names)["tasks"]
    from lm_eval.tasks import get_task_dict

    return get_task_dict(names, manager)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Hub-schema files of the REAL documents (``hub/``), the converter's output from the REAL rows
    (``converted/``), and lm-eval's built-in tasks pointed at the hub files (``ref_<name>``)."""
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm_eval_tasks")
    refs = root / "ref"
    refs.mkdir()
    for task, rows in REAL.items():
        name = NAMES[task]
        (root / "src" / task).mkdir(parents=True)
        (root / "src" / task / "test.json").write_text(json.dumps(
            [{"instruction": ins, "input": "", "output": f"the correct answer is {ans}", "answer": ans}
             for ins, ans, _ in rows]))
        path = _write(root / "hub" / f"{name}.{'parquet' if name in PARQUET else 'jsonl'}", [d for *_, d in rows])
        builtin = Path(lm_eval.__file__).parent / "tasks" / BUILTIN_YAML[name]
        assert f"task: {name}\n" in builtin.read_text(), f"{builtin} is not lm-eval's {name} task"
        (refs / f"ref_{name}.yaml").write_text(json.dumps({
            "include": str(builtin), "task": f"ref_{name}", "tag": [],
            "dataset_path": {".jsonl": "json"}.get(path.suffix, "parquet"), "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(path)}},
            "training_split": None, "validation_split": None, "test_split": "test"}))
    written = convert(root / "src", root / "converted")
    manager = TaskManager(include_defaults=False, include_path=[str(TASKS_DIR), str(refs)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        built = {}
        for source in ("hub", "converted"):
            patch.setenv("LILY_SSM_LM_EVAL_DATA", str(root / source))
            built[source] = _load_tasks(manager, [f"{name}_local" for name in BUILTIN_YAML])
        built["ref"] = _load_tasks(manager, [f"ref_{name}" for name in BUILTIN_YAML])
        yield {"root": root, "written": written, "manager": manager, "tasks": built,
               "requests": {key: _requests(tasks) for key, tasks in built.items()}}


# ---------------------------------------------------------------------------------------------- converter


def _question_and_options(task: str, doc: dict) -> tuple[str, list[str]]:
    """What an LLM-Adapters instruction holds of the hub document ``doc``."""
    if task == "boolq":
        return doc["question"] + "?", []
    if task == "piqa":
        return doc["goal"], [doc["sol1"], doc["sol2"]]
    if task == "social_i_qa":
        return f"{doc['context']} {doc['question']}", [doc["answerA"], doc["answerB"], doc["answerC"]]
    if task == "hellaswag":
        return f"{doc['activity_label']}: {doc['ctx']}", doc["endings"]
    if task == "winogrande":
        return doc["sentence"], [doc["option1"], doc["option2"]]
    return doc.get("question_stem", doc.get("question")), doc["choices"]["text"]  # ARC, openbookqa


@pytest.mark.parametrize("task", list(REAL))
def test_converter_cuts_the_real_one_line_layout_exactly(task):
    for instruction, _, doc in REAL[task]:
        question, options, labels = split_instruction(instruction)
        assert (question, options) == _question_and_options(task, doc)
        assert len(labels) == max(len(options), 2)


def test_converter_output_for_the_real_rows_of_all_8_tasks(world):
    assert world["written"] == {NAMES[task]: len(rows) for task, rows in REAL.items()}
    docs = {name: [json.loads(line) for line in (world["root"] / "converted" / f"{name}.jsonl").open()]
            for name in NAMES.values()}
    assert docs["boolq"] == [{"query": "Question: is house tax and property tax are same?\nAnswer:",
                              "choices": ["no", "yes"], "gold": 1}]
    from lm_eval.tasks.hellaswag.utils import preprocess  # brackets cleaned as lm-eval's hellaswag does

    assert docs["hellaswag"][2] == {"query": preprocess("Computers and Electronics: " + _WIKIHOW_CTX),
                                    "choices": [preprocess(e) for e in _WIKIHOW_ENDINGS], "gold": 0}
    assert not any("[" in text for doc in docs["hellaswag"] for text in (doc["query"], *doc["choices"]))
    assert docs["winogrande"][0] == REAL["winogrande"][0][2]
    counts = {name: sorted({len(d["choices"]) if "choices" in d else 2 for d in rows}) for name, rows in docs.items()}
    assert counts == {"boolq": [2], "piqa": [2], "social_iqa": [3], "hellaswag": [4], "winogrande": [2],
                      "arc_easy": [3, 5], "arc_challenge": [4], "openbookqa": [4]}
    assert [d["gold"] for d in docs["openbookqa"]] == [0, 1]


def test_the_multiline_layout_still_parses():
    question, options, _ = split_instruction(
        "Please choose the correct solution to the question: how to boil water?\n\nSolution1: heat it\n\n"
        "Solution2: freeze it\n\nAnswer format: solution1/solution2")
    assert question == "how to boil water?" and options == ["heat it", "freeze it"]


@pytest.mark.parametrize("task, instruction, answer, message", [
    ("piqa", "Tell me: x\n\nSolution1: a\n\nSolution2: b\n\nAnswer format: solution1/solution2", "solution1",
     "expected the instruction to begin 'Please ... question: '"),
    ("piqa", "Please choose the correct solution to the question: x\n\nSolution1: a\n\nSolution2: b", "solution1",
     "expected the instruction to end with 'Answer format:"),
    ("social_i_qa", "Please choose the correct answer to the question: x\n\nAnswer1: a Answer3: c\n\n"
     "Answer format: answer1/answer2/answer3", "answer1", "expected 3 options Answer1..Answer3 .*no 'Answer2: '"),
    ("winogrande", "Please choose the correct answer to fill in the blank to complete the given sentence: a _ b"
     "\n\nOption1: x Option2: y Answer format: option1/option2", "option3", "answer 'option3' is not one of"),
    ("winogrande", "Please choose the correct answer to fill in the blank to complete the given sentence: a b"
     "\n\nOption1: x Option2: y Answer format: option1/option2", "option1", "expected a blank '_'"),
    ("openbookqa", "Please choose the correct answer to the question: x\n\nAnswer1: a Answer2: b Answer3: c\n\n"
     "Answer format: answer1/answer2/answer3", "answer1", "openbookqa expects 4 options labelled Answer1"),
    ("ARC-Easy", "Please choose the correct answer to the question: x\n\nAnswer1: a Answer2: b Answer3: c Answer4: d"
     "\n\nAnswer format: answer1/answer2/answer3", "answer1", "lists 3 options, but the last one holds .*Answer4:"),
], ids=["no-lead", "no-answer-format", "missing-option", "answer-not-listed", "no-blank", "option-count",
        "extra-option"])
def test_converter_errors_name_the_file_row_and_what_was_expected(task, instruction, answer, message):
    with pytest.raises(ValueError, match=f"^data/{task}/test.json row 7: .*{message}"):
        convert_row(task, {"instruction": instruction, "answer": answer}, f"data/{task}/test.json row 7")


def test_main_reports_a_user_error_in_one_line_and_exits_2(tmp_path, capsys):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "test.json").write_text(json.dumps([{"instruction": "Please choose the correct solution "
                                                               "to the question: x\n\nAnswer format: a/b",
                                                               "answer": "a"}]))
    for argv in (["--src", str(tmp_path), "--out", str(tmp_path / "out")],
                 ["--src", str(tmp_path / "missing")], ["--src", str(tmp_path), "--tasks", "siqa"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("convert_llm_adapters: error: ")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- requests against the built-ins


@pytest.mark.parametrize("name", list(BUILTIN_YAML))
def test_hub_schema_requests_equal_the_builtin_task(world, name):
    ours, ref = world["requests"]["hub"][f"{name}_local"], world["requests"]["ref"][f"ref_{name}"]
    assert ours and ours == ref


@pytest.mark.parametrize("name", LOSSLESS)
def test_converted_requests_equal_the_builtin_task(world, name):
    ours, ref = world["requests"]["converted"][f"{name}_local"], world["requests"]["ref"][f"ref_{name}"]
    assert ours and ours == ref


def test_converted_boolq_and_hellaswag_lose_what_the_readme_says(world):
    requests = world["requests"]
    ours, ref = requests["converted"]["boolq_local"], requests["ref"]["ref_boolq"]
    assert [(i, k, (_BOOLQ_PASSAGE + "\n" + c, t)) for i, k, (c, t) in ours] == ref  # no passage
    ours, ref = requests["converted"]["hellaswag_local"], requests["ref"]["ref_hellaswag"]
    assert [r for r in ours if r[0] == 2] == [r for r in ref if r[0] == 2]  # wikihow: no ctx_b, nothing lost
    assert {r[2][0] for r in ours if r[0] < 2} == {"Roof shingle removal: A man is sitting on a roof. he",
                                                 "Clean and jerk: A lady walks to a barbell. She bends down and "
                                                 "grabs the pole. the lady"}
    assert {r[2][0] for r in ref if r[0] < 2} == {"Roof shingle removal: A man is sitting on a roof. He",
                                                "Clean and jerk: A lady walks to a barbell. She bends down and "
                                                "grabs the pole. The lady"}
    assert [r[2][1] for r in ours] == [r[2][1] for r in ref]


# ------------------------------------------------------------------------------------------------- loader


def test_loader_reads_google_boolq_answers_and_rejects_unknown_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("LILY_SSM_LM_EVAL_DATA", str(tmp_path))
    _write(tmp_path / "boolq.jsonl", [{"question": "is it", "passage": "It is.", "answer": True}])
    assert task_utils.read_docs("boolq", task_utils.find_file("boolq")) == [
        {"query": "It is.\nQuestion: is it?\nAnswer:", "choices": ["no", "yes"], "gold": 1}]
    _write(tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g"}])
    with pytest.raises(ValueError, match=r"piqa.jsonl line 2: fields goal; piqa expects the converted fields "
                                         r"query, choices, gold or the hub fields goal, sol1, sol2, label"):
        task_utils.load("piqa")
    _write(tmp_path / "piqa.parquet", [{"query": "q", "choices": ["a", "b"], "gold": 0}])
    with pytest.raises(ValueError, match="both .*piqa.jsonl and .*piqa.parquet exist"):
        task_utils.find_file("piqa")
    with pytest.raises(FileNotFoundError, match=r"hellaswag.jsonl \(or .parquet\) is missing"):
        task_utils.find_file("hellaswag")


# ------------------------------------------------------------------------------------------ loglikelihoods


def _byte_level_lm():
    """A tiny random Falcon-Mamba over a byte-level tokenizer (every character counts), as an lm-eval HFLM."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = byte_level_falcon()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)


def test_loglikelihoods_and_accuracy_equal_the_builtin_tasks(world):
    names = list(BUILTIN_YAML)
    lm = _byte_level_lm()
    runs = {}
    for source, prefix, suffix in (("hub", "", "_local"), ("ref", "ref_", "")):
        tasks = [world["tasks"][source][f"{prefix}{name}{suffix}"] for name in names]
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=world["manager"], log_samples=True,
                                      bootstrap_iters=0)
        runs[source] = {name: ([s["resps"] for s in out["samples"][f"{prefix}{name}{suffix}"]],
                               out["results"][f"{prefix}{name}{suffix}"]["acc,none"]) for name in names}
    assert runs["hub"] == runs["ref"]
    resps = [r[0][0] for name in names for sample in runs["hub"][name][0] for r in sample]
    assert len(set(resps)) == len(resps)  # the model tells every request apart

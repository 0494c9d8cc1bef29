"""Convert LLM-Adapters commonsense ``<task>/test.json`` files into the JSONL files read by the offline
lm-eval tasks in ``eval/lm_eval_tasks`` (``*_local``).

    python eval/convert_llm_adapters.py --src /path/to/dataset --out eval/lm_eval_tasks/data

LLM-Adapters keeps each item's question and options inside one instruction string: a lead ("Please
choose the correct answer to the question: "), the question, the labelled options and the answer format,
e.g. ``...question: X\\n\\nAnswer1: a Answer2: b Answer3: c\\n\\nAnswer format: answer1/answer2/answer3``.
The published files put the options on one line, separated by single spaces (piqa by blank lines;
winogrande's answer format follows on the same line); the answer format says how many options there
are and how they are labelled. This script cuts the question and options out exactly as written and
builds lm-eval's prompt, choices and target from them.

The result is lossy for two tasks, whose prompts then differ from lm-eval's built-in tasks, so their
scores do not compare with them: boolq (the files have no passages, so ``boolq_local`` scores
question-only prompts, "Question: ...?\\nAnswer:") and hellaswag (the files join ``ctx_a`` and ``ctx_b``,
so ``ctx_b`` is not capitalised as lm-eval does). For exact lm-eval prompts put hub-schema files in the
data folder instead (see ``eval/lm_eval_tasks/utils.py``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_eval_tasks.utils import hellaswag_preprocess  # noqa: E402

from lily_ssm.data.commonsense import TEST_FIELDS, read_rows  # noqa: E402
from lily_ssm.utils.atomic import write_atomic  # noqa: E402

TASK_FILES = {"boolq": "boolq", "piqa": "piqa", "social_i_qa": "social_iqa", "hellaswag": "hellaswag",
              "winogrande": "winogrande", "ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge",
              "openbookqa": "openbookqa"}
# the option label each task's answer format uses, and how many options it may have
OPTIONS = {"boolq": ("", (0,)), "piqa": ("solution", (2,)), "social_i_qa": ("answer", (3,)),
           "hellaswag": ("ending", (4,)), "winogrande": ("option", (2,)), "ARC-Easy": ("answer", (3, 4, 5)),
           "ARC-Challenge": ("answer", (3, 4, 5)), "openbookqa": ("answer", (4,))}
_LEAD = re.compile(r"Please [^:\n]*?(?:question|sentence): ")
_FORMAT = re.compile(r"(?:\n\n| )Answer format: (\S+)\s*\Z")
_LABEL = re.compile(r"([a-z]+)(\d+)")
_SEP = r"(?:\n\n| )"  # before each option label: a blank line or one space


def _short(text: str, size: int = 100) -> str:
    return repr(text if len(text) <= size else text[:size] + "...")


def split_instruction(text: str) -> tuple[str, list[str], list[str]]:
    """``(question, options, labels)`` from an LLM-Adapters instruction, each cut out exactly as written;
    ``labels`` are the answer format's (``["solution1", "solution2"]``; boolq ``["true", "false"]``).
    Raises ValueError saying what was expected."""
    lead = _LEAD.match(text)
    if not lead:
        raise ValueError("expected the instruction to begin 'Please ... question: ' or 'Please ... sentence: '")
    fmt = _FORMAT.search(text, lead.end())
    if not fmt:
        raise ValueError("expected the instruction to end with 'Answer format: label1/label2/...'")
    labels = fmt.group(1).lower().split("/")
    body = text[lead.end(): fmt.start()]
    if labels == ["true", "false"]:
        return body, [], labels
    first = _LABEL.fullmatch(labels[0])
    word = first.group(1) if first else ""
    if labels != [f"{word}{k}" for k in range(1, len(labels) + 1)]:
        raise ValueError(f"expected an answer format like 'answer1/answer2/...' or 'true/false', got {fmt.group(1)!r}")
    name = word.capitalize()
    starts, ends = [], []
    for k in range(1, len(labels) + 1):
        marker = re.compile(_SEP + re.escape(f"{name}{k}: "))
        found = marker.search(body, ends[-1] if ends else 0)
        if not found:
            raise ValueError(f"expected {len(labels)} options {name}1..{name}{len(labels)} (from the answer format "
                             f"{fmt.group(1)!r}), each after a blank line or a space; found no '{name}{k}: '")
        starts.append(found.start())
        ends.append(found.end())
    options = [body[end: start] for end, start in zip(ends, starts[1:] + [len(body)])]
    extra = re.search(_SEP + re.escape(name) + r"\d+: ", options[-1])
    if extra:
        raise ValueError(f"the answer format {fmt.group(1)!r} lists {len(labels)} options, but the last one holds "
                         f"another label {extra.group().strip()!r}")
    return body[: starts[0]], options, labels


def convert_row(task: str, row: dict, where: str) -> dict:
    """The JSONL document of one LLM-Adapters test row; ``where`` (file and row) starts every error."""
    try:
        question, options, labels = split_instruction(row["instruction"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}: {_short(row['instruction'])}") from None
    word, counts = OPTIONS[task]
    expected_labels = ["true", "false"] if task == "boolq" else [f"{word}{k}" for k in range(1, len(options) + 1)]
    if labels != expected_labels or len(options) not in counts:
        expected = "'Answer format: true/false'" if task == "boolq" else \
            f"{' or '.join(map(str, counts))} options labelled {word.capitalize()}1, {word.capitalize()}2, ..."
        raise ValueError(f"{where}: {task} expects {expected}; the answer format is {'/'.join(labels)!r}")
    answer = row["answer"].strip().lower()
    if answer not in labels:
        raise ValueError(f"{where}: answer {row['answer']!r} is not one of the answer format's {'/'.join(labels)}")
    gold = labels.index(answer)
    if task == "boolq":
        return {"query": f"Question: {question.removesuffix('?')}?\nAnswer:", "choices": ["no", "yes"],
                "gold": int(answer == "true")}
    if task == "winogrande":
        if "_" not in question:
            raise ValueError(f"{where}: expected a blank '_' in the winogrande sentence {_short(question)}")
        return {"sentence": question, "option1": options[0], "option2": options[1], "answer": str(gold + 1)}
    if task == "hellaswag":
        return {"query": hellaswag_preprocess(question), "choices": [hellaswag_preprocess(o) for o in options],
                "gold": gold}
    query = {"piqa": f"Question: {question}\nAnswer:", "social_i_qa": f"Q: {question}\nA:",
             "openbookqa": question}.get(task, f"Question: {question}\nAnswer:")  # the last: ARC
    return {"query": query, "choices": options, "gold": gold}


def convert(src: str | Path, out: str | Path, tasks: list[str] | None = None) -> dict[str, int]:
    """Convert every task folder found under ``src`` (or the listed ``tasks``); returns rows per file.
    Every file is checked before any is written."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a folder")
    for task in tasks or []:
        if task not in TASK_FILES:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_FILES)}")
    tasks = tasks or [t for t in TASK_FILES if (src / t / "test.json").is_file()]
    if not tasks:
        raise FileNotFoundError(f"no <task>/test.json under {src}; tasks: {', '.join(TASK_FILES)}")
    converted = {}
    for task in tasks:
        path = src / task / "test.json"
        rows = read_rows(path, TEST_FIELDS)
        converted[TASK_FILES[task]] = [json.dumps(convert_row(task, row, f"{path} row {i}"), ensure_ascii=False)
                                       for i, row in enumerate(rows)]
    for name, lines in converted.items():
        write_atomic(out / f"{name}.jsonl", "\n".join(lines) + "\n")
    return {name: len(lines) for name, lines in converted.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="folder with <task>/test.json (LLM-Adapters layout)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "lm_eval_tasks" / "data"))
    parser.add_argument("--tasks", default=None, help="comma-separated subset (default: all found)")
    args = parser.parse_args(argv)
    try:
        written = convert(args.src, args.out, args.tasks.split(",") if args.tasks else None)
    except (ValueError, FileNotFoundError) as exc:
        print(f"convert_llm_adapters: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for name, count in written.items():
        print(f"{Path(args.out) / (name + '.jsonl')}: {count} items")


if __name__ == "__main__":
    main()

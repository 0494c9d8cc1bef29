"""Convert LLM-Adapters commonsense ``<task>/test.json`` files into the JSONL files read by the offline
lm-eval tasks in ``eval/lm_eval_tasks`` (same prompt and choices as lm-eval's built-in tasks).

    python eval/convert_llm_adapters.py --src /path/to/dataset --out eval/lm_eval_tasks/data

LLM-Adapters keeps each item's question and options inside one instruction string ("...question: X
Answer1: ... Answer format: answer1/answer2"); this script parses them back out. BoolQ's passages are
not in those files, so ``boolq_local`` scores question-only prompts ("Question: ...?\\nAnswer:").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lily_ssm.data.commonsense import TEST_FIELDS, read_rows  # noqa: E402
from lily_ssm.utils.atomic import write_atomic  # noqa: E402

TASK_FILES = {"boolq": "boolq", "piqa": "piqa", "social_i_qa": "social_iqa", "hellaswag": "hellaswag",
              "winogrande": "winogrande", "ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge",
              "openbookqa": "openbookqa"}
_OPTION = re.compile(r"(?:^|\n)\s*(Solution|Answer|Ending|Option)\s*(\d+)\s*:\s*", re.IGNORECASE)
_LEAD = re.compile(r"^.*?(?:question|sentence)\s*:\s*", re.IGNORECASE | re.DOTALL)


def split_instruction(text: str) -> tuple[str, list[str]]:
    """``(question, options)`` from an LLM-Adapters instruction."""
    body = re.split(r"\n?\s*Answer format\s*:", text, flags=re.IGNORECASE)[0]
    markers = list(_OPTION.finditer(body))
    head = body[: markers[0].start()] if markers else body
    question = _LEAD.sub("", head, count=1).strip()
    options = [body[m.end(): (markers[i + 1].start() if i + 1 < len(markers) else len(body))].strip()
               for i, m in enumerate(markers)]
    return question, options


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def convert_row(task: str, row: dict, where: str) -> dict:
    question, options = split_instruction(row["instruction"])
    answer = row["answer"].strip().lower()
    if task == "boolq":
        if answer not in ("true", "false"):
            raise ValueError(f"{where}: boolq answer {answer!r}; expected true or false")
        return {"query": f"Question: {question.rstrip('?')}?\nAnswer:", "choices": ["no", "yes"],
                "gold": int(answer == "true")}
    digits = re.findall(r"\d+", answer)
    if not options or not digits or not 1 <= int(digits[0]) <= len(options):
        raise ValueError(f"{where}: cannot match answer {answer!r} to the {len(options)} options in the instruction")
    gold = int(digits[0]) - 1
    if task == "winogrande":
        if "_" not in question:
            raise ValueError(f"{where}: winogrande sentence has no blank '_': {question!r}")
        return {"sentence": question, "option1": options[0], "option2": options[1], "answer": str(gold + 1)}
    if task == "piqa":
        return {"query": f"Question: {question}\nAnswer:", "choices": options, "gold": gold}
    if task == "social_i_qa":
        return {"query": f"Q: {question}\nA:", "choices": options, "gold": gold}
    if task == "hellaswag":
        return {"query": _hellaswag_clean(question), "choices": [_hellaswag_clean(o) for o in options], "gold": gold}
    if task == "openbookqa":
        return {"query": question, "choices": options, "gold": gold}
    return {"query": f"Question: {question}\nAnswer:", "choices": options, "gold": gold}  # ARC


def convert(src: str | Path, out: str | Path, tasks: list[str] | None = None) -> dict[str, int]:
    """Convert every task folder found under ``src`` (or the listed ``tasks``); returns rows per file."""
    src, out = Path(src), Path(out)
    written = {}
    for task in tasks or [t for t in TASK_FILES if (src / t / "test.json").is_file()]:
        if task not in TASK_FILES:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_FILES)}")
        path = src / task / "test.json"
        rows = read_rows(path, TEST_FIELDS)
        lines = [json.dumps(convert_row(task, row, f"{path} row {i}")) for i, row in enumerate(rows)]
        write_atomic(out / f"{TASK_FILES[task]}.jsonl", "\n".join(lines) + "\n")
        written[TASK_FILES[task]] = len(lines)
    if not written:
        raise FileNotFoundError(f"no <task>/test.json under {src}; tasks: {', '.join(TASK_FILES)}")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="folder with <task>/test.json (LLM-Adapters layout)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "lm_eval_tasks" / "data"))
    parser.add_argument("--tasks", default=None, help="comma-separated subset (default: all found)")
    args = parser.parse_args()
    written = convert(args.src, args.out, args.tasks.split(",") if args.tasks else None)
    for name, count in written.items():
        print(f"{Path(args.out) / (name + '.jsonl')}: {count} items")


if __name__ == "__main__":
    main()

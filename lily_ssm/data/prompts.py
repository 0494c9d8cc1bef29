"""The Alpaca-style prompt (LLM-Adapters' commonsense protocol) and each task's answer pattern.

One prompt function serves training and evaluation, so the text a model is tuned on is exactly the
text it is scored on: at evaluation the response is left empty and generated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def build_prompt(instruction: str, input: str | None = None, output: str = "") -> str:
    """The full prompt; with ``output=""`` it ends right where the model's response starts."""
    template = _WITH_INPUT if input else _WITHOUT_INPUT
    return template.format(instruction=instruction, input=input or "") + output


@dataclass(frozen=True)
class Task:
    """One commonsense test set: its folder name under the data root and its answer pattern."""

    name: str
    pattern: str
    size: int  # items in the standard test.json

    def extract(self, generated: str) -> str:
        """The first match of the answer pattern in ``generated`` (case-insensitive), or ``""``."""
        match = re.search(self.pattern, generated.lower())
        return match.group(0) if match else ""


_MC5 = r"answer1|answer2|answer3|answer4|answer5"
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("boolq", r"true|false", 3270),
        Task("piqa", r"solution1|solution2", 1838),
        Task("social_i_qa", _MC5, 1954),
        Task("hellaswag", r"ending1|ending2|ending3|ending4", 10042),
        Task("winogrande", r"option1|option2", 1267),
        Task("ARC-Easy", _MC5, 2376),
        Task("ARC-Challenge", _MC5, 1172),
        Task("openbookqa", _MC5, 500),
    )
}


def resolve_tasks(names: str | list[str] | None) -> list[Task]:
    """Task objects for a comma-separated string or list (all eight when empty), with a clear error."""
    if not names:
        return list(TASKS.values())
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(TASKS)}")
    return [TASKS[n] for n in names]

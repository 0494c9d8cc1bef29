"""The Alpaca-style prompts of the commonsense protocol, and each task's answer pattern (docs/design.md §5).

Two protocols:

* ``paper`` (the default): the published scripts' prompts byte for byte (LLM-Adapters ``finetune.py`` /
  ``commonsense_evaluate.py`` and the Lily authors' ``finetune_mamba.py`` / ``evaluate_mamba.py``). They
  are indented Python f-strings, so every line after the first starts with 16 spaces, and the training
  and evaluation templates differ in whitespace: the training template's blank lines hold 16 spaces,
  the evaluation template's are empty; the header ends in ``"request.  "`` (training, no input),
  ``"request. "`` (training with input, and evaluation without) or ``"request."`` (evaluation with
  input); both end their prompt with ``"### Response:\\n"`` and 16 spaces. Use it to compare with the
  paper.
* ``clean``: one dedented template for training and evaluation, so the model is scored on exactly the
  text it was tuned on, with no indentation spending tokens inside ``cutoff_len``. Its numbers are
  not comparable with the paper's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROTOCOLS = ("paper", "clean")

_WITH_INPUT_HEADER = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.")
_NO_INPUT_HEADER = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.")
_I = " " * 16  # the published f-strings' indentation

_CLEAN_WITH_INPUT = _WITH_INPUT_HEADER + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
_CLEAN_NO_INPUT = _NO_INPUT_HEADER + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
_PAPER_TRAIN_WITH_INPUT = (_WITH_INPUT_HEADER + " \n\n" + _I + "### Instruction:\n" + _I + "{instruction}\n" + _I + "\n"
                           + _I + "### Input:\n" + _I + "{input}\n" + _I + "\n" + _I + "### Response:\n" + _I)
_PAPER_TRAIN_NO_INPUT = (_NO_INPUT_HEADER + "  \n\n" + _I + "### Instruction:\n" + _I + "{instruction}\n" + _I + "\n"
                         + _I + "### Response:\n" + _I)
_PAPER_EVAL_WITH_INPUT = (_WITH_INPUT_HEADER + "\n\n" + _I + "### Instruction:\n" + _I + "{instruction}\n\n"
                          + _I + "### Input:\n" + _I + "{input}\n\n" + _I + "### Response:\n" + _I)
_PAPER_EVAL_NO_INPUT = (_NO_INPUT_HEADER + " \n\n" + _I + "### Instruction:\n" + _I + "{instruction}\n\n"
                        + _I + "### Response:\n" + _I)
RESPONSE_MARKER = "### Response:"


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; protocols: {', '.join(PROTOCOLS)}")
    return protocol


def _fill(template: str, instruction: str, input: str | None) -> str:
    return template.format(instruction=instruction, input=input or "")  # braces in the values stay as they are


def training_prompt(instruction: str, input: str | None = None, output: str = "", protocol: str = "paper") -> str:
    """The training text of a row; with ``output=""`` it is the prompt whose tokens the loss can mask."""
    if check_protocol(protocol) == "clean":
        return _fill(_CLEAN_WITH_INPUT if input else _CLEAN_NO_INPUT, instruction, input) + output
    return _fill(_PAPER_TRAIN_WITH_INPUT if input else _PAPER_TRAIN_NO_INPUT, instruction, input) + output


def evaluation_prompt(instruction: str, input: str | None = None, protocol: str = "paper") -> str:
    """The text the model continues at evaluation (the published evaluator's template for ``paper``).

    The published evaluator calls its template without the row's input; every commonsense test row's
    input is empty, where the two agree."""
    if check_protocol(protocol) == "clean":
        return training_prompt(instruction, input, protocol="clean")
    return _fill(_PAPER_EVAL_WITH_INPUT if input else _PAPER_EVAL_NO_INPUT, instruction, input)


def response_text(decoded: str, continuation: str, protocol: str = "paper") -> str:
    """The text the answer is read from. ``paper``: the published evaluator's, the decoded prompt +
    generation split on ``"### Response:"``, the part after the first marker (up to a second one),
    stripped. ``clean``: the generated continuation."""
    if check_protocol(protocol) == "clean":
        return continuation
    parts = decoded.split(RESPONSE_MARKER)
    if len(parts) < 2:
        raise ValueError(f"the decoded prompt + generation holds no {RESPONSE_MARKER!r}, which the paper protocol "
                         "reads the answer after: this tokenizer does not give the prompt back as written (it "
                         f"lowercases or drops spaces?); decoded text: {decoded[:80]!r}. Use protocol clean")
    return parts[1].strip()


@dataclass(frozen=True)
class Task:
    """One commonsense test set: its folder name under the data root and its answer pattern."""

    name: str
    pattern: str
    size: int  # items in the standard test.json

    def extract(self, text: str) -> str:
        """The first case-insensitive match of the answer pattern in ``text``, as written, or ``""``
        (the published evaluator's ``re.findall(pattern, text.strip(), re.IGNORECASE)[0]``)."""
        found = re.findall(self.pattern, text.strip(), re.IGNORECASE)
        return found[0] if found else ""


def is_correct(answer: str, predicted: str, protocol: str = "paper") -> bool:
    """``paper``: the published evaluator's ``label == predict.lower()`` (the gold label as stored);
    ``clean``: case-insensitive, surrounding whitespace ignored."""
    if check_protocol(protocol) == "clean":
        return predicted.lower() == answer.strip().lower()
    return answer == predicted.lower()


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

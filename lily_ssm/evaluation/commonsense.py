"""The eight-task commonsense evaluation (LLM-Adapters protocol): generate from the protocol's prompt,
take the first match of the task's answer pattern, score agreement with the gold answer.

``protocol="paper"`` is the published evaluator (``evaluate_mamba.py``): its prompt, 4 beams and 32 new
tokens, the answer read after ``"### Response:"`` in the decoded text, ``re.findall`` with
``re.IGNORECASE``, and ``label == prediction.lower()``. ``protocol="clean"`` reads the answer from the
generated continuation and is greedy by default (see :mod:`lily_ssm.data.prompts`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..data.commonsense import TEST_FIELDS, read_rows, resolve_data_root
from ..data.prompts import Task, check_protocol, evaluation_prompt, is_correct, resolve_tasks, response_text
from ..tuners.model import ADAPTER_ATTR
from ..utils.atomic import write_atomic

# Decoding of the published evaluator (LLM-Adapters' and the Lily authors' evaluate scripts).
DECODING_DEFAULTS = {"paper": {"num_beams": 4, "max_new_tokens": 32}, "clean": {"num_beams": 1, "max_new_tokens": 32}}


def task_test_file(data_root: str | Path, task: Task) -> Path:
    path = resolve_data_root(data_root) / task.name / "test.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected <data-root>/{task.name}/test.json for task {task.name}")
    return path


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}; must be a positive integer")


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], batch_size: int = 16, num_beams: int = 1,
                       max_new_tokens: int = 32) -> list[tuple[str, str]]:
    """``(continuation, prompt + continuation)`` decoded for each prompt (greedy, or beam search with
    ``num_beams > 1``), special tokens skipped.

    Prompts are left-padded and batched by length; with lily-ssm's mask-aware routing an item's
    result does not depend on the batch it lands in (``batch`` routing excepted: it is refused with
    ``batch_size > 1``).
    """
    _positive("batch_size", batch_size)
    _positive("num_beams", num_beams)
    _positive("max_new_tokens", max_new_tokens)
    config = getattr(getattr(model, ADAPTER_ATTR, None), "config", None)
    if getattr(config, "routing", None) == "batch" and batch_size > 1:
        raise ValueError(f"the adapter uses routing='batch', which mixes the experts over the whole batch, so an "
                         f"item's answer would depend on the other {batch_size - 1} items in its batch; evaluate it "
                         "with batch size 1 (as the published evaluator does)")
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    outputs: list[tuple[str, str]] = [("", "")] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(device)
        generated = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        full = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for index, continuation, decoded in zip(chunk, new, full):
            outputs[index] = (continuation, decoded)
    return outputs


def evaluate_commonsense(model, tokenizer, data_root: str | Path, tasks: str | list[str] | None = None,
                         batch_size: int = 16, num_beams: int | None = None, max_new_tokens: int | None = None,
                         limit: int | None = None, output_dir: str | Path | None = None,
                         log: Any = print, protocol: str = "paper") -> dict[str, Any]:
    """Accuracy per task and on average; with ``output_dir``, writes ``results.json``, ``results.md``
    and every item's prediction (with the exact prompt fed to the model) to ``predictions/<task>.jsonl``.

    ``num_beams`` and ``max_new_tokens`` default to the protocol's (:data:`DECODING_DEFAULTS`)."""
    defaults = DECODING_DEFAULTS[check_protocol(protocol)]
    num_beams = defaults["num_beams"] if num_beams is None else num_beams
    max_new_tokens = defaults["max_new_tokens"] if max_new_tokens is None else max_new_tokens
    if limit is not None:
        _positive("limit", limit)
    selected = resolve_tasks(tasks)
    files = {task.name: task_test_file(data_root, task) for task in selected}  # fail before any generation
    model.eval()
    results: dict[str, Any] = {"tasks": {}, "settings": {"protocol": protocol, "batch_size": batch_size,
                                                         "num_beams": num_beams, "max_new_tokens": max_new_tokens,
                                                         "limit": limit}}
    predictions: dict[str, list[dict[str, Any]]] = {}
    for task in selected:
        rows = read_rows(files[task.name], TEST_FIELDS)[:limit]
        start = time.perf_counter()
        prompts = [evaluation_prompt(r["instruction"], r.get("input"), protocol) for r in rows]
        texts = generate_responses(model, tokenizer, prompts, batch_size, num_beams, max_new_tokens)
        items = []
        for index, (row, prompt, (continuation, decoded)) in enumerate(zip(rows, prompts, texts)):
            response = response_text(decoded, continuation, protocol)
            predicted = task.extract(response)
            items.append({"index": index, "answer": row["answer"], "prediction": predicted,
                          "correct": is_correct(row["answer"], predicted, protocol), "prompt": prompt,
                          "response": response, "generated": continuation})
        correct = sum(item["correct"] for item in items)
        results["tasks"][task.name] = {"accuracy": correct / len(items), "correct": correct, "total": len(items)}
        predictions[task.name] = items
        log(f"{task.name:>14}: {100 * correct / len(items):5.1f}% ({correct}/{len(items)}) "
            f"in {time.perf_counter() - start:.1f}s")
    accuracies = [r["accuracy"] for r in results["tasks"].values()]
    results["average"] = sum(accuracies) / len(accuracies)
    if output_dir is not None:
        write_results(results, predictions, output_dir)
    return results


def markdown_table(columns: dict[str, dict[str, Any]]) -> str:
    """A markdown table of accuracy (%) per task, one column per named result set."""
    names = list(columns)
    tasks = list(next(iter(columns.values()))["tasks"])
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for task in tasks:
        cells = [f"{100 * columns[n]['tasks'][task]['accuracy']:.1f}" for n in names]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **average** | " + " | ".join(f"**{100 * columns[n]['average']:.1f}**" for n in names) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], predictions: dict[str, list[dict[str, Any]]],
                  output_dir: str | Path) -> None:
    out = Path(output_dir)
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(out / "results.md", markdown_table({"accuracy (%)": results}))
    for task, items in predictions.items():
        write_atomic(out / "predictions" / f"{task}.jsonl", "".join(json.dumps(i) + "\n" for i in items))

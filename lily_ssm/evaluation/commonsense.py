"""The eight-task commonsense evaluation (LLM-Adapters protocol): generate from the shared prompt,
take the first match of the task's answer pattern, score exact agreement with the gold answer."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..data.commonsense import TEST_FIELDS, read_rows, resolve_data_root
from ..data.prompts import Task, build_prompt, resolve_tasks
from ..utils.atomic import write_atomic


def task_test_file(data_root: str | Path, task: Task) -> Path:
    path = resolve_data_root(data_root) / task.name / "test.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected <data-root>/{task.name}/test.json for task {task.name}")
    return path


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], batch_size: int = 16, num_beams: int = 1,
                       max_new_tokens: int = 32) -> list[str]:
    """Decoded continuations of ``prompts`` (greedy, or beam search with ``num_beams > 1``).

    Prompts are left-padded and batched by length; with lily-ssm's mask-aware routing an item's
    result does not depend on the batch it lands in.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; must be at least 1")
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(device)
        generated = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = generated[:, enc["input_ids"].shape[1]:]
        for index, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
            outputs[index] = text
    return outputs


def evaluate_commonsense(model, tokenizer, data_root: str | Path, tasks: str | list[str] | None = None,
                         batch_size: int = 16, num_beams: int = 1, max_new_tokens: int = 32,
                         limit: int | None = None, output_dir: str | Path | None = None,
                         log: Any = print) -> dict[str, Any]:
    """Accuracy per task and on average; with ``output_dir``, writes ``results.json``, ``results.md``
    and every item's prediction to ``predictions/<task>.jsonl``."""
    selected = resolve_tasks(tasks)
    files = {task.name: task_test_file(data_root, task) for task in selected}  # fail before any generation
    model.eval()
    results: dict[str, Any] = {"tasks": {}, "settings": {"batch_size": batch_size, "num_beams": num_beams,
                                                         "max_new_tokens": max_new_tokens, "limit": limit}}
    predictions: dict[str, list[dict[str, Any]]] = {}
    for task in selected:
        rows = read_rows(files[task.name], TEST_FIELDS)[:limit]
        start = time.perf_counter()
        texts = generate_responses(model, tokenizer, [build_prompt(r["instruction"], r.get("input")) for r in rows],
                                   batch_size, num_beams, max_new_tokens)
        items = []
        for index, (row, text) in enumerate(zip(rows, texts)):
            predicted = task.extract(text)
            items.append({"index": index, "answer": row["answer"].strip().lower(), "prediction": predicted,
                          "correct": predicted == row["answer"].strip().lower(), "generated": text})
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

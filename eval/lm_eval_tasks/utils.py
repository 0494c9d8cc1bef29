"""Documents for the offline commonsense tasks (``*_local``), read from local files.

Each task reads ``<name>.jsonl`` or ``<name>.parquet`` (exactly one of them) from the folder
``$LILY_SSM_LM_EVAL_DATA``, else ``data/`` beside this file; the names are boolq, piqa, social_iqa,
hellaswag, winogrande, arc_easy, arc_challenge and openbookqa. The file's schema is told from its
fields:

* hub schema: the fields of the hub data set that lm-eval's built-in task reads (super_glue boolq,
  hellaswag, piqa, social_iqa, winogrande, ai2_arc, openbookqa; see ``HUB_FIELDS``). Each document
  gets the built-in task's own prompt, choices and target (hellaswag's cleaning included), so the
  requests are exactly the built-in task's.
* converted: ``{query, choices, gold}`` as written by ``eval/convert_llm_adapters.py`` from the
  LLM-Adapters ``test.json`` files, used as they are. Those files lack boolq's passage and hellaswag's
  ``ctx_a``/``ctx_b`` split, so the boolq and hellaswag prompts differ from lm-eval's.

winogrande's two schemas are the same: ``{sentence, option1, option2, answer}``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("lily_ssm.lm_eval_tasks")

CONVERTED_FIELDS = ("query", "choices", "gold")
HUB_FIELDS = {
    "boolq": ("question", "passage"),  # and ``label`` (super_glue) or ``answer`` (google/boolq)
    "piqa": ("goal", "sol1", "sol2", "label"),
    "social_iqa": ("context", "question", "answerA", "answerB", "answerC", "label"),
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "arc_easy": ("question", "choices", "answerKey"),
    "arc_challenge": ("question", "choices", "answerKey"),
    "openbookqa": ("question_stem", "choices", "answerKey"),
}
LOSSY_CONVERTED = {"boolq": "no passages", "hellaswag": "no ctx_a/ctx_b split, so ctx_b is not capitalised"}


def data_dir() -> Path:
    return Path(os.environ.get("LILY_SSM_LM_EVAL_DATA", Path(__file__).parent / "data"))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag cleaning: strip, ``[title]`` to a full stop, drop other ``[tags]``, no double spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _from_hub(name: str, doc: dict[str, Any]) -> dict[str, Any]:
    """A hub-schema document in the form the task YAMLs read, built as lm-eval's built-in task builds it."""
    if name == "winogrande":
        return {key: str(doc[key]) for key in HUB_FIELDS[name]}
    if name == "boolq":
        label = doc["label"] if "label" in doc else doc["answer"]
        return {"query": f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", "choices": ["no", "yes"],
                "gold": int(label)}
    if name == "piqa":
        return {"query": f"Question: {doc['goal']}\nAnswer:", "choices": [doc["sol1"], doc["sol2"]],
                "gold": int(doc["label"])}
    if name == "social_iqa":
        return {"query": f"Q: {doc['context']} {doc['question']}\nA:",
                "choices": [doc["answerA"], doc["answerB"], doc["answerC"]], "gold": int(doc["label"]) - 1}
    if name == "hellaswag":
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]], "gold": int(doc["label"])}
    choices = doc["choices"]
    if name == "openbookqa":
        return {"query": doc["question_stem"], "choices": list(choices["text"]),
                "gold": list(choices["label"]).index(doc["answerKey"].lstrip())}
    return {"query": f"Question: {doc['question']}\nAnswer:", "choices": list(choices["text"]),  # ARC
            "gold": list(choices["label"]).index(doc["answerKey"])}


def _schema(name: str, fields: set[str]) -> str | None:
    if name != "winogrande" and set(CONVERTED_FIELDS) <= fields:
        return "converted"
    hub = set(HUB_FIELDS[name]) | ({"label"} if name == "boolq" and "answer" not in fields else set())
    return "hub" if hub <= fields else None


def _read(path: Path) -> list[tuple[str, Any]]:
    """``(where, row)`` for each row of a ``.jsonl`` or ``.parquet`` file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return [(f"{path} row {i}", row) for i, row in enumerate(pyarrow.parquet.read_table(path).to_pylist())]
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number}: not valid JSON ({exc})") from None
    return rows


def read_docs(name: str, path: Path) -> list[dict[str, Any]]:
    """The documents of task ``name`` in ``path``, in the form the task YAMLs read."""
    rows = _read(path)
    if not rows:
        raise ValueError(f"{path}: the file holds no rows")
    docs, schema = [], None
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
        found = _schema(name, set(row))
        if found is None:
            converted = "" if name == "winogrande" else f"the converted fields {', '.join(CONVERTED_FIELDS)} or "
            hub = ", ".join(HUB_FIELDS[name]) + (", label (or answer)" if name == "boolq" else "")
            raise ValueError(f"{where}: fields {', '.join(row) or '(none)'}; {name} expects {converted}the hub "
                             f"fields {hub}")
        if schema and found != schema:
            raise ValueError(f"{where}: a {found}-schema row after {schema}-schema rows; use one schema per file")
        schema = found
        if schema == "converted":
            docs.append({key: row[key] for key in CONVERTED_FIELDS})
            continue
        try:
            docs.append(_from_hub(name, row))
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{where}: cannot read this {name} hub-schema row ({type(exc).__name__}: {exc})") from None
    if schema == "converted" and name in LOSSY_CONVERTED:
        log.warning("%s: converted LLM-Adapters data (%s): the %s_local prompts differ from lm-eval's %s, so "
                    "its scores do not compare", path, LOSSY_CONVERTED[name], name, name)
    return docs


def find_file(name: str) -> Path:
    """``<name>.jsonl`` or ``<name>.parquet`` in the data folder; exactly one must exist."""
    found = [path for path in (data_dir() / f"{name}.jsonl", data_dir() / f"{name}.parquet") if path.is_file()]
    if len(found) > 1:
        raise ValueError(f"both {found[0]} and {found[1]} exist; keep one")
    if not found:
        raise FileNotFoundError(f"{data_dir() / name}.jsonl (or .parquet) is missing: write hub-schema rows "
                                f"there, or run eval/convert_llm_adapters.py --src <dataset root> --out {data_dir()}"
                                f" (or set LILY_SSM_LM_EVAL_DATA)")
    return found[0]


def load(name: str, **_: object):
    """lm-eval ``custom_dataset`` hook: the ``test`` split of task ``name``."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_docs(name, find_file(name)))})


def winogrande_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc):
    index = doc["sentence"].index("_") + 1
    return doc["sentence"][index:].strip()


def winogrande_choices(doc):
    index = doc["sentence"].index("_")
    return [doc["sentence"][:index] + option for option in (doc["option1"], doc["option2"])]

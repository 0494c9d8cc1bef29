"""Commonsense170K-style data: reading and validating files, tokenising with the protocol's prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..utils.paths import cache_dir, looks_like_local_path
from .prompts import training_prompt

TRAIN_FIELDS = ("instruction", "output")
TEST_FIELDS = ("instruction", "answer")
OPTIONAL_TEXT_FIELDS = ("input",)


BUILTIN_DATA = "builtin:synthetic-commonsense"
BUILTIN_SIZES = {"train_per_task": 1000, "test_per_task": 40, "seed": 0}


def resolve_data_root(source: str | Path) -> Path:
    """A data folder as given; ``builtin:synthetic-commonsense`` becomes the generated data set in the
    cache (training file ``commonsense_170k.json`` and ``<task>/test.json``), written on first use."""
    if not str(source).startswith("builtin:"):
        return Path(source)
    if str(source) != BUILTIN_DATA:
        raise ValueError(f"unknown built-in data set {source!r}; built-in data: {BUILTIN_DATA}")
    from .synthetic import write_synthetic_commonsense

    root = cache_dir() / "synthetic-commonsense"
    if not (root / "commonsense_170k.json").is_file():
        write_synthetic_commonsense(root, **BUILTIN_SIZES)
    return root


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and row."""


def validate_rows(rows: Any, source: str, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Check ``rows`` is a non-empty list of objects whose ``required`` fields are strings (not null)."""
    if not isinstance(rows, list):
        raise DataError(f"{source}: expected a JSON list of objects, got {type(rows).__name__}")
    if not rows:
        raise DataError(f"{source}: the file holds no rows")
    clean = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {index} is a {type(row).__name__}, expected an object")
        for name in required:
            if name not in row:
                raise DataError(f"{source}: row {index} has no {name!r} field (fields: {', '.join(row)})")
        for name in (*required, *OPTIONAL_TEXT_FIELDS):
            value = row.get(name)
            if value is None and name in required:
                raise DataError(f"{source}: row {index} field {name!r} is null, expected text")
            if name in row and value is not None and not isinstance(value, str):
                raise DataError(f"{source}: row {index} field {name!r} is a {type(value).__name__}, expected text")
        if not row["instruction"].strip():
            raise DataError(f"{source}: row {index} has an empty 'instruction'")
        clean.append({**row, "input": row.get("input") or ""})
    return clean


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark is dropped); another encoding fails with the file's
    name and the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
                        "save it as UTF-8") from exc


def read_rows(path: str | Path, required: tuple[str, ...] = TRAIN_FIELDS) -> list[dict[str, str]]:
    """Rows of a ``.json`` list or ``.jsonl`` file, validated."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"data file {path} is a folder; give a .json list or a .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = _read_text(path, "data file")
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {lineno} is not valid JSON ({exc})") from exc
    else:
        try:
            rows = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
    return validate_rows(rows, str(path), required)


def check_train_source(source: str) -> None:
    """Raise at once, reading nothing, if ``source`` cannot be training data: an unknown ``builtin:`` name,
    or a ``.json`` / ``.jsonl`` file (or any name that can only be a local path) that is missing or a folder.
    A dataset id passes: it is checked when it is loaded."""
    if source.startswith("builtin:"):
        if source != BUILTIN_DATA:
            raise ValueError(f"unknown built-in data set {source!r}; built-in data: {BUILTIN_DATA}")
        return
    path = Path(source).expanduser()
    if path.suffix in (".json", ".jsonl") or looks_like_local_path(source) or path.exists():
        if path.is_dir():
            raise IsADirectoryError(f"data file {source} is a folder; give a .json list or a .jsonl file")
        if not path.is_file():
            raise FileNotFoundError(f"data file {source} does not exist; give a .json list or a .jsonl file, or "
                                    f"{BUILTIN_DATA}")


def load_train_dataset(source: str, val_set_size: int = 0, seed: int = 42):
    """Commonsense170K as ``datasets`` splits ``train`` (and ``validation`` when ``val_set_size > 0``).

    ``source`` is a local ``.json``/``.jsonl`` file or a dataset id available on this machine.
    """
    import datasets

    if source.startswith("builtin:"):
        source = str(resolve_data_root(source) / "commonsense_170k.json")
    if Path(source).suffix in (".json", ".jsonl") or Path(source).exists():
        rows = read_rows(source)
    else:
        rows = validate_rows(list(datasets.load_dataset(source, split="train")), source, TRAIN_FIELDS)
    data = datasets.Dataset.from_list(rows)
    if val_set_size <= 0:
        return datasets.DatasetDict({"train": data})
    if val_set_size >= len(data):
        raise DataError(f"{source}: val_set_size={val_set_size} leaves no training rows ({len(data)} rows in all)")
    split = data.train_test_split(test_size=val_set_size, shuffle=True, seed=seed)
    return datasets.DatasetDict({"train": split["train"], "validation": split["test"]})


def tokenize_row(row: dict[str, str], tokenizer, cutoff_len: int, train_on_inputs: bool = True,
                 add_eos: bool = True, protocol: str = "paper") -> dict[str, list[int]]:
    """Token ids of the protocol's training text (prompt + response), cut at ``cutoff_len``, as the
    published ``finetune.py`` tokenises it; with ``train_on_inputs=False`` the prompt's tokens (the
    training text with an empty response, tokenised alone) get label -100 so only the response is learned."""
    full = training_prompt(row["instruction"], row.get("input"), row["output"], protocol)
    ids = tokenizer(full, truncation=True, max_length=cutoff_len, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and len(ids) < cutoff_len and ids[-1:] != [eos]:
        ids = ids + [eos]
    labels = list(ids)
    if not train_on_inputs:
        prompt = training_prompt(row["instruction"], row.get("input"), "", protocol)
        n_prompt = len(tokenizer(prompt, truncation=True, max_length=cutoff_len, add_special_tokens=True)["input_ids"])
        labels[:n_prompt] = [-100] * min(n_prompt, len(labels))
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

"""Loaders for the offline commonsense tasks: JSONL files written by eval/convert_llm_adapters.py.

The data folder is ``$LILY_SSM_LM_EVAL_DATA`` if set, else ``data/`` beside this file.
"""

import os
from pathlib import Path

import datasets


def data_dir() -> Path:
    return Path(os.environ.get("LILY_SSM_LM_EVAL_DATA", Path(__file__).parent / "data"))


def load(name: str, **_: object) -> datasets.DatasetDict:
    path = data_dir() / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run eval/convert_llm_adapters.py --src <dataset root> "
                                f"--out {data_dir()} (or set LILY_SSM_LM_EVAL_DATA)")
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(path), split="train")})


def winogrande_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc):
    index = doc["sentence"].index("_") + 1
    return doc["sentence"][index:].strip()


def winogrande_choices(doc):
    index = doc["sentence"].index("_")
    return [doc["sentence"][:index] + option for option in (doc["option1"], doc["option2"])]

"""Running data through a saved adapter's model to record its router mixes: the model is rebuilt from the run's
record (a language run's base model and tokenizer, a VTAB task's backbone) or named by the caller."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config.record import EXPERIMENT_NAME, RESULT_NAME
from .adapters import SavedAdapter
from .routing import record_router_weights, router_matrix

DATA_HELP = ("a commonsense JSON/JSONL file, a test-set root with <task>/test.json, builtin:synthetic-commonsense, "
             "or, for a VTAB task folder, the VTAB-1K root")


def _interleave(lists: list[list[Any]], limit: int) -> list[Any]:
    mixed = (item for group in itertools.zip_longest(*lists) for item in group if item is not None)
    return list(itertools.islice(mixed, limit))


def commonsense_prompts(data: str, limit: int, protocol: str = "paper") -> list[str]:
    """Evaluation prompts (of ``protocol``) of the first ``limit`` items of a JSON / JSONL file, or of
    the test sets ``<root>/<task>/test.json`` taken in turn."""
    from ..data.commonsense import read_rows, resolve_data_root
    from ..data.prompts import TASKS, evaluation_prompt

    path = resolve_data_root(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {data} does not exist; give {DATA_HELP}")
    if path.is_file():
        rows = read_rows(path, ("instruction",))[:limit]
    else:
        files = [path / task / "test.json" for task in TASKS if (path / task / "test.json").is_file()]
        if not files:
            raise FileNotFoundError(f"--data {data} is a folder without <task>/test.json for any of "
                                    f"{', '.join(TASKS)}; give {DATA_HELP}")
        rows = _interleave([read_rows(f, ("instruction",))[:limit] for f in files], limit)
    return [evaluation_prompt(row["instruction"], row.get("input"), protocol) for row in rows]


def _language_base(adapter: SavedAdapter, model: str | None) -> str:
    """The base model a language adapter is run on: ``model`` if given, else its run's own."""
    record = adapter.record if adapter.record is not None and adapter.record.kind == "language" else None
    if model is None and (record is None or record.base_model is None):
        hint = ""
        if adapter.meta["base_model"].get("architecture") == "VisionMamba":
            hint = (f" It is a Vision Mamba adapter without {RESULT_NAME} (written when `lily-ssm vtab` finishes a "
                    "task), so its model cannot be rebuilt.")
        raise ValueError(f"no base model for {adapter.folder}: pass --model (a hub id, local folder or "
                         f"builtin:tiny-falcon-mamba), or keep the {EXPERIMENT_NAME} that `lily-ssm train` writes in "
                         f"the adapter folder.{hint}")
    return model if model is not None else record.base_model


def _vtab_test_list(adapter: SavedAdapter, data: str) -> Path:
    task = adapter.record.task
    path = Path(data) / task / "test.txt"
    if not path.is_file():
        raise FileNotFoundError(f"--data {data} has no {task}/test.txt; for the VTAB task folder "
                                f"{adapter.folder} give the VTAB-1K root (with <task>/test.txt)")
    return path


def check_recording_inputs(adapters: list[SavedAdapter], data: str, model: str | None) -> None:
    """Raise at once if recording the router weights of ``adapters`` on ``data`` would fail for a missing
    input (the data, a VTAB task's test list, a local base model): nothing is loaded."""
    from ..models.loading import check_model_source

    for adapter in adapters:
        if adapter.method != "lily" or not adapter.has_routers:
            continue
        if adapter.record is not None and adapter.record.kind == "vtab":
            _vtab_test_list(adapter, data)
        else:
            commonsense_prompts(data, 1)
            check_model_source(_language_base(adapter, model))


def _language_model(adapter: SavedAdapter, model: str | None, dtype: str | None) -> tuple[Any, Any, int]:
    """The adapted language model: ``model`` if given, else the run's own base model, dtype and tokenizer;
    and the run's ``data.cutoff_len`` (256 without a record)."""
    from ..models.loading import load_model_and_tokenizer
    from ..persistence import load_adapter

    record = adapter.record if adapter.record is not None and adapter.record.kind == "language" else None
    _language_base(adapter, model)
    if model is None:  # the run's own model, dtype and tokenizer
        section = record.section("model")
        lm, tokenizer = load_model_and_tokenizer(record.base_model, dtype or section.get("dtype", "auto"),
                                                 tokenizer=section.get("tokenizer"),
                                                 trust_remote_code=bool(section.get("trust_remote_code")))
    else:
        lm, tokenizer = load_model_and_tokenizer(model, dtype or "auto")
    load_adapter(lm, adapter.folder)
    return lm, tokenizer, int(record.section("data").get("cutoff_len", 256)) if record else 256


def _vtab_model(adapter: SavedAdapter, log: Callable[[str], Any]) -> tuple[Any, Any]:
    """The adapted VTAB backbone (Vim or ViT) a task folder's ``result.json`` names, and its image settings."""
    from ..config.vtab import VtabDataSection, VtabExperiment, VtabModelSection, VtabTrainingSection
    from ..persistence import load_adapter

    record = adapter.record
    try:
        section = VtabModelSection(**record.section("model"))
        section.check()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{record.source}: config.model is not a VTAB model section: {exc}") from exc
    experiment = VtabExperiment(model=section, adapter=dict(record.section("adapter") or adapter.meta["config"]),
                                data=VtabDataSection(root=""), training=VtabTrainingSection(output_dir=""))
    seed = record.section("training").get("seed", VtabTrainingSection.seed)
    if not section.checkpoint:
        log(f"  {adapter.name}: {RESULT_NAME} names no {section.kind} checkpoint, so the base is a fresh random init "
            f"(seed {seed}); the router weights are those of the adapter on that base")
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = experiment.build_model(record.task)
    load_adapter(model, adapter.folder)
    return model, section.image_settings(model)


@torch.no_grad()
def record_mixes(adapter: SavedAdapter, data: str, model: str | None = None, limit: int = 64,
                 batch_size: int = 8, dtype: str | None = None, device: str | None = None,
                 log: Callable[[str], Any] = print) -> None:
    """Run the first ``limit`` items of ``data`` through the adapted model and store each sample's mean
    router mix per slot (``adapter.mixes``) and the mean router weights per type (``adapter.router_matrices``)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if adapter.record is not None and adapter.record.kind == "vtab":
        from torch.utils.data import DataLoader, Subset

        from ..data.vtab import VTabDataset

        task = adapter.record.task
        _vtab_test_list(adapter, data)
        if model is not None:
            log(f"  {adapter.name}: --model is not used for a VTAB task folder; its backbone is rebuilt from "
                f"{RESULT_NAME}")
        net, images = _vtab_model(adapter, log)
        dataset = VTabDataset(data, task, "test", image_size=images.size, mean=images.mean, std=images.std)
        loader = DataLoader(Subset(dataset, range(min(limit, len(dataset)))), batch_size=batch_size)
        batches = ((pixels,) for pixels, _ in loader)
        source = f"{data} ({task} test)"
    else:
        record = adapter.record
        protocol = record.protocol if record is not None and record.kind == "language" else "paper"
        prompts = commonsense_prompts(data, limit, protocol)  # a bad data path fails before the model loads
        net, tokenizer, cutoff = _language_model(adapter, model, dtype)
        tokenizer.padding_side = "left"
        batches = (tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                             max_length=cutoff) for i in range(0, len(prompts), batch_size))
        source = data
    net.to(device).eval()
    log(f"  {adapter.name}: recording router weights on {source}")
    samples = 0
    with record_router_weights(net, per_sample=True) as recorder:
        for batch in batches:
            if isinstance(batch, tuple):
                recorder.batch_size = len(batch[0])
                net(batch[0].to(device))
            else:
                recorder.batch_size = len(batch["input_ids"])
                net(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    use_cache=False)
            samples += recorder.batch_size
    adapter.mixes = {key: rows.double() for key, rows in recorder.samples.items()}
    adapter.router_matrices = router_matrix(net, recorder)
    adapter.samples = samples

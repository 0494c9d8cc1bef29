"""Adapters to the Hugging Face Hub: :func:`push_adapter` uploads a folder with a generated model card."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..config.record import read_record
from ..persistence import read_adapter, save_adapter
from ..persistence.hub import ADAPTER_FILES, HubError, hub_offline, hub_reason, is_hub_id, resolve_adapter
from ..utils.hub_access import hub_endpoint, hub_unreachable


def model_card(folder: str | os.PathLike, repo_id: str) -> str:
    """The README.md for a lily-ssm adapter folder: base model, method, targets, parameter count, and
    the results found beside it (``results.json`` from eval-commonsense, ``result.json`` from vtab)."""
    folder = Path(folder)
    meta, tensors = read_adapter(folder)
    config = meta["config"]
    record = read_record(folder)
    base = (record.base_model if record else None) or meta["base_model"].get("architecture", "unknown")
    count = sum(t.numel() for t in tensors.values())
    targets = config["targets"] if isinstance(config["targets"], str) else ", ".join(config["targets"])
    settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(config.items())
                         if k not in ("method", "targets", "overrides", "modules_to_save") and v not in (None, [], {}))
    front = ["---", *([f"base_model: {base}"] if is_hub_id(base) else []), "library_name: lily-ssm", "tags:",
             "- lily-ssm", f"- {config['method']}", "---"]
    lines = [
        *front,
        "",
        f"# {repo_id}",
        "",
        f"A {_METHODS.get(config['method'], config['method'])} adapter for `{base}`, trained with lily-ssm.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| method | {config['method']} |",
        f"| targets | `{targets}` |",
        f"| settings | {settings} |",
        f"| trainable parameters | {count:,} |",
    ]
    if config.get("overrides"):
        lines.append(f"| per-target overrides | `{json.dumps(config['overrides'])}` |")
    if config.get("modules_to_save"):
        lines.append(f"| trained in full | {', '.join(config['modules_to_save'])} |")
    lines += ["", *_results_section(folder), "## Use", "", "```python", "import lily_ssm",
              "from transformers import AutoModelForCausalLM", "",
              f"model = AutoModelForCausalLM.from_pretrained({base!r})",
              f"model = lily_ssm.load_adapter(model, {repo_id!r})", "```", ""]
    return "\n".join(lines)


_METHODS = {"lily": "Lily (Low-Rank Interconnected Adaptation across Layers)", "lora": "LoRA"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _results_section(folder: Path) -> list[str]:
    commonsense, vtab = _read_json(folder / "results.json"), _read_json(folder / "result.json")
    lines: list[str] = []
    if isinstance(commonsense, dict) and isinstance(commonsense.get("tasks"), dict):
        lines += ["## Results", "", "| task | accuracy (%) |", "|---|---:|"]
        for task, entry in commonsense["tasks"].items():
            if isinstance(entry, dict) and isinstance(entry.get("accuracy"), (int, float)):
                lines.append(f"| {task} | {100 * entry['accuracy']:.1f} |")
        if isinstance(commonsense.get("average"), (int, float)):
            lines.append(f"| **average** | **{100 * commonsense['average']:.1f}** |")
        lines.append("")
    if isinstance(vtab, dict) and isinstance(vtab.get("test_accuracy"), (int, float)):
        lines += ["## Results", "", f"VTAB-1K {vtab.get('task')}: test accuracy {100 * vtab['test_accuracy']:.1f}% "
                  f"after {vtab.get('epochs')} epochs.", ""]
    return lines


def push_adapter(model_or_folder: nn.Module | str | os.PathLike, repo_id: str, *, private: bool | None = None,
                 revision: str | None = None, commit_message: str | None = None, token: str | None = None,
                 api: Any = None) -> str:
    """Upload an adapter (an adapted model, or a folder ``save_adapter`` wrote) to the Hub repository
    ``repo_id`` (created if needed) with a generated model card; returns the commit URL. ``api`` is a
    ``huggingface_hub.HfApi`` (one is made with ``token`` by default)."""
    if not is_hub_id(repo_id):
        raise HubError(f"repo_id {repo_id!r} is not a Hub repository id; use org/name")
    if hub_offline():
        raise HubError(f"cannot push to {repo_id!r}: the Hub is switched off (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE")
    # seconds, not half a minute of retries (a given api may have an endpoint of its own)
    if api is None and (reason := hub_unreachable()) is not None:
        raise HubError(f"cannot push to {repo_id!r}: the Hub at {hub_endpoint()} is unreachable ({reason}); push from "
                       "a machine with network")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="lily-ssm-push-") as tmp:
        staging = Path(tmp)
        if isinstance(model_or_folder, nn.Module):
            save_adapter(model_or_folder, staging)
        else:
            source = resolve_adapter(model_or_folder)  # a folder here, or another Hub adapter's snapshot
            read_adapter(source)  # a damaged or foreign folder is refused before anything is uploaded
            for name in ADAPTER_FILES:
                if (source / name).is_file() and name != "README.md":
                    (staging / name).write_bytes((source / name).read_bytes())
        (staging / "README.md").write_text(model_card(staging, repo_id), encoding="utf-8")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(staging), repo_id=repo_id, revision=revision,
                                     commit_message=commit_message or "Upload lily-ssm adapter")
        except Exception as exc:  # huggingface_hub raises HTTP, connection and auth errors of many types
            raise HubError(f"pushing to {repo_id!r} failed: {hub_reason(exc)}") from exc
    return str(getattr(info, "commit_url", info))

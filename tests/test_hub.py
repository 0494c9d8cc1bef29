"""Adapters from and to the Hugging Face Hub, without a network: Hub ids resolve through a local
Hugging Face cache laid out as huggingface_hub lays it out, and pushes go to a recording stand-in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import randomise_adapter, tiny_mamba
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

import lily_ssm
from lily_ssm.cli import main
from lily_ssm.interop import push as push_module
from lily_ssm.persistence.hub import HubError, resolve_adapter
from lily_ssm.utils import hub_access

CONFIG = lily_ssm.LoraConfig(["in_proj", "x_proj"], r=2, alpha=4)
MAIN, V1 = "a" * 40, "b" * 40


def _adapter(folder: Path, seed: int) -> Path:
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), CONFIG)
    randomise_adapter(model, seed=seed)
    return lily_ssm.save_adapter(model, folder)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding the adapter repository org/ada: main and tag v1 (other weights)."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--org--ada"
    for commit, seed in ((MAIN, 1), (V1, 2)):
        _adapter(repo / "snapshots" / commit, seed)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(2, 12).reshape(1, -1)).logits


def test_hub_ids_resolve_to_the_cached_snapshot_at_a_revision(hub_cache):
    assert resolve_adapter("org/ada") == hub_cache / "snapshots" / MAIN
    assert resolve_adapter("org/ada", revision="v1") == hub_cache / "snapshots" / V1
    assert resolve_adapter("org/ada", revision=V1) == hub_cache / "snapshots" / V1
    from_hub = _logits(lily_ssm.load_adapter(tiny_mamba("falcon"), "org/ada", revision="v1"))
    local = _logits(lily_ssm.load_adapter(tiny_mamba("falcon"), hub_cache / "snapshots" / V1))
    torch.testing.assert_close(from_hub, local, atol=0, rtol=0)
    assert (from_hub - _logits(lily_ssm.load_adapter(tiny_mamba("falcon"), "org/ada"))).abs().max() > 1e-3


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hub_cache / "snapshots" / V1, tmp_path / "org" / "ada")
    assert resolve_adapter("org/ada") == Path("org/ada")
    with pytest.raises(ValueError, match="revision='v1' was given, but org/ada is a local folder"):
        resolve_adapter("org/ada", revision="v1")


def test_paths_that_cannot_be_hub_ids_fail_as_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter folder \./runs/x does not exist$"):
        resolve_adapter("./runs/x")
    with pytest.raises(FileNotFoundError, match=r"adapter folder nope does not exist \(a Hub adapter is named"):
        resolve_adapter("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_adapter(tmp_path / "org" / "ada")  # a Path is always local


def test_offline_hub_ids_fail_in_one_line_saying_so(hub_cache, tmp_path, capsys, monkeypatch):
    with pytest.raises(HubError, match="not in the local Hugging Face cache .* and the Hub is switched off .HF_HUB_"
                                       "OFFLINE=1.: download it on a machine with network .hf download org/missing."):
        lily_ssm.load_adapter(tiny_mamba("falcon"), "org/missing")
    with pytest.raises(HubError, match="adapter 'org/ada' at revision 'v9' is not in the local Hugging Face cache"):
        resolve_adapter("org/ada", revision="v9")
    assert main(["inspect", "org/missing", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "HF_HUB_OFFLINE=1" in err

    def unreachable(*args, **kwargs):  # what huggingface_hub raises without a network (and no HF_HUB_OFFLINE)
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder") from OSError(
            "ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_access, "_probed", {constants.ENDPOINT: None})  # the up-front probe found the Hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(HubError, match="the Hub is unreachable .offline. ConnectError: .Errno -2. Name or service"):
        lily_ssm.load_adapter(tiny_mamba("falcon"), "org/missing")


def test_lm_eval_backend_resolves_the_adapter_before_loading_the_model(hub_cache):
    pytest.importorskip("lm_eval")
    from lily_ssm.evaluation.harness import LilyLM

    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1"):
        LilyLM(pretrained="./no-such-model", adapter="org/missing")


class RecordingApi:
    """The two HfApi calls push_adapter makes, recording what would be uploaded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}

    def create_repo(self, repo_id: str, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, folder_path: str, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        self.files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/org/ada/commit/1"})()


def test_push_uploads_the_adapter_with_a_model_card(tmp_path, monkeypatch):
    folder = _adapter(tmp_path / "trained", seed=1)
    (folder / "experiment.yaml").write_text("model:\n  name_or_path: tiiuae/falcon-mamba-7b\n")
    (folder / "results.json").write_text(json.dumps({"tasks": {"boolq": {"accuracy": 0.625}}, "average": 0.625}))
    monkeypatch.setattr(push_module, "hub_offline", lambda: False)
    api = RecordingApi()
    url = lily_ssm.push_adapter(folder, "org/ada", private=True, api=api)
    assert url.endswith("/commit/1")
    assert api.calls[0] == ("create_repo", {"repo_id": "org/ada", "private": True, "exist_ok": True})
    assert set(api.files) == {"adapter_config.json", "adapter_model.safetensors", "experiment.yaml", "results.json",
                              "README.md"}
    assert api.files["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()
    card = api.files["README.md"].decode()
    count = sum(p.numel() for p in lily_ssm.load_adapter(tiny_mamba("falcon"), folder).lily_ssm_adapter.parameters())
    for expected in ("base_model: tiiuae/falcon-mamba-7b", "library_name: lily-ssm", "| method | lora |",
                     "| targets | `in_proj, x_proj` |", f"| trainable parameters | {count:,} |", "| boolq | 62.5 |",
                     "lily_ssm.load_adapter(model, 'org/ada')"):
        assert expected in card

    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), CONFIG)  # an adapted model is saved, then pushed
    lily_ssm.push_adapter(model, "org/ada", api=api)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} == set(api.files)


def test_push_refuses_offline_and_bad_ids_in_one_line(tmp_path, capsys):
    folder = _adapter(tmp_path / "trained", seed=1)
    assert main(["push", str(folder), "org/ada"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "HF_HUB_OFFLINE=1" in err
    with pytest.raises(HubError, match="'not an id' is not a Hub repository id"):
        lily_ssm.push_adapter(folder, "not an id")

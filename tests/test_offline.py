"""A Hub id with no network, or with HF_HUB_OFFLINE=1 and nothing cached, fails up front, within seconds, in one
line that says what to do, for every command that takes a model or adapter id; a cached one still works offline."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import language_assets
from huggingface_hub import constants

from lily_ssm.cli import main as cli
from lily_ssm.data.vtab import write_fake_vtab
from lily_ssm.utils import hub_access

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
UNROUTABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once, as with no network
COMMIT = "c" * 40


@pytest.fixture(params=["HF_HUB_OFFLINE=1", "no network"])
def hub(request, tmp_path, monkeypatch):
    """An empty Hugging Face cache, and the Hub switched off or unreachable; yields what the error must say."""
    offline = request.param == "HF_HUB_OFFLINE=1"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", UNROUTABLE)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(hub_access, "_probed", {})
    return "the Hub is switched off (HF_HUB_OFFLINE=1)" if offline else f"the Hub at {UNROUTABLE} is unreachable"


@pytest.fixture(scope="module", autouse=True)
def _imported():
    """The commands' modules imported beforehand: the time measured is the command's, not Python's first import of
    transformers' Trainer (seconds on a busy machine)."""
    import lily_ssm.analysis.inspect
    import lily_ssm.evaluation.commonsense
    import lily_ssm.interop.convert
    import lily_ssm.interop.push
    import lily_ssm.train.trainer
    import lily_ssm.train.vtab  # noqa: F401


def fails_fast(capsys, argv: list[str], what: str, repo: str, why: str) -> None:
    start = time.monotonic()
    assert cli(argv) == 2
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Retrying" not in err, err
    assert f"{what} '{repo}' is not in the local Hugging Face cache" in lines[0] and why in lines[0], err
    assert f"hf download {repo}" in lines[0] and "HF_HOME" in lines[0] and "local folder" in lines[0], err
    assert elapsed < 5, f"{argv[0]} took {elapsed:.1f} s to refuse an unreachable Hub id"


def test_eval_commonsense(hub, capsys):
    fails_fast(capsys, ["eval-commonsense", "--model", "tiiuae/falcon-mamba-7b", "--data-root",
                        "builtin:synthetic-commonsense"], "model", "tiiuae/falcon-mamba-7b", hub)
    fails_fast(capsys, ["eval-commonsense", "--model", "builtin:tiny-falcon-mamba", "--adapter", "org/ada",
                        "--data-root", "builtin:synthetic-commonsense"], "adapter", "org/ada", hub)


def test_train_leaves_nothing_behind(hub, tmp_path, capsys):
    out = tmp_path / "run"
    fails_fast(capsys, ["train", str(CONFIGS / "tiny" / "lily_in.yaml"), "--set", "model.name_or_path=org/lm",
                        "--set", f"training.output_dir={out}"], "model", "org/lm", hub)
    assert not out.exists()
    fails_fast(capsys, ["train", str(CONFIGS / "tiny" / "lily_in.yaml"), "--dry-run", "--set",
                        "model.name_or_path=org/lm"], "model", "org/lm", hub)


def test_vtab_with_a_vit_hub_checkpoint(hub, tmp_path, capsys):
    write_fake_vtab(tmp_path / "vtab", "eurosat", classes=2, per_class=1, image_size=8)
    fails_fast(capsys, ["vtab", str(CONFIGS / "vit" / "tiny.yaml"), "--task", "eurosat", "--set",
                        "model.checkpoint=google/vit-base-patch16-224-in21k", "--set", f"data.root={tmp_path / 'vtab'}",
                        "--set", f"training.output_dir={tmp_path / 'run'}"],
               "ViT checkpoint", "google/vit-base-patch16-224-in21k", hub)


def test_inspect_convert_and_push(hub, tmp_path, capsys):
    fails_fast(capsys, ["inspect", "org/ada", "--out", str(tmp_path / "out")], "adapter", "org/ada", hub)
    fails_fast(capsys, ["convert", "--to-peft", "org/ada", str(tmp_path / "peft")], "adapter", "org/ada", hub)
    folder = tmp_path / "adapter"
    folder.mkdir()
    start = time.monotonic()
    assert cli(["push", str(folder), "org/ada"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot push to 'org/ada'" in err and time.monotonic() - start < 5


def test_lm_eval_backend(hub):
    pytest.importorskip("lm_eval")
    from lily_ssm.evaluation.harness import LilyLM

    start = time.monotonic()
    with pytest.raises(hub_access.HubError, match=f"model 'org/lm' is not in the local Hugging Face cache .*{hub[:9]}"):
        LilyLM(pretrained="org/lm")
    assert time.monotonic() - start < 5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return language_assets(tmp_path_factory.mktemp("assets"), train_per_task=2, test_per_task=2)


def test_a_cached_model_still_works_without_the_hub(hub, assets, tmp_path, capsys, caplog):
    """The model in the local cache (as hf download leaves it) evaluates with the Hub off or unreachable; with no
    network the process switches itself to offline mode (one line says so) instead of retrying."""
    repo = Path(constants.HF_HUB_CACHE) / "models--org--tiny"
    shutil.copytree(assets["base"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    start = time.monotonic()
    assert cli(["eval-commonsense", "--model", "org/tiny", "--data-root", assets["root"], "--tasks", "boolq",
                "--limit", "1", "--protocol", "clean", "--num-beams", "1"]) == 0
    assert "Retrying" not in capsys.readouterr().err and time.monotonic() - start < 60
    if "unreachable" in hub:
        said = [r.message for r in caplog.records if "using the cached copy of org/tiny" in r.message]
        assert constants.HF_HUB_OFFLINE and len(said) == 1


def test_a_hub_id_shaped_local_folder_is_a_folder(hub, tmp_path, monkeypatch):
    from lily_ssm.models.loading import check_model_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    check_model_source("org/tiny")  # no Hub involved


def test_the_probe_runs_once(hub, monkeypatch):
    if "switched off" in hub:
        pytest.skip("offline mode never probes")
    calls = []
    monkeypatch.setattr(hub_access, "_probe", lambda endpoint: calls.append(endpoint) or "refused")
    for _ in range(3):
        with pytest.raises(hub_access.HubError):
            hub_access.require_hub_repo("org/x")
    assert calls == [UNROUTABLE]



def test_a_cached_tokenizer_repo_needs_no_model_config(hub):
    """A tokenizer-only repository (no config.json) in the cache is enough for model.tokenizer."""
    from lily_ssm.models.loading import check_model_source

    snapshot = Path(constants.HF_HUB_CACHE) / "models--org--tok" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer_config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    check_model_source("org/tok", "tokenizer")
    with pytest.raises(hub_access.HubError, match="model 'org/tok' is not in the local Hugging Face cache"):
        check_model_source("org/tok")

"""`lily-ssm inspect`: effective ranks against torch.linalg.matrix_rank, per-sample router mixes, figures."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from conftest import randomise_adapter, tiny_mamba

import lily_ssm
from lily_ssm.analysis.inspect import inspect_adapters
from lily_ssm.analysis.rank import (
    effective_rank,
    lily_sample_ranks,
    lora_layer_ranks,
    low_rank_effective_rank,
    threshold_text,
)
from lily_ssm.analysis.routing import RouterRecorder, record_router_weights
from lily_ssm.cli import main as cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_VIM = Path(__file__).resolve().parents[1] / "configs" / "vim" / "tiny.yaml"


def of_rank(rank: int, rows: int, cols: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return (torch.randn(rows, rank, generator=gen, dtype=dtype) @ torch.randn(rank, cols, generator=gen, dtype=dtype))


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1024, path


# ----------------------------------------------------------------------------------------------
# Effective rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_effective_rank_matches_matrix_rank_on_constructed_matrices(dtype):
    gen = torch.Generator().manual_seed(0)
    known = [0, 1, 3, 5, 8]
    batch = torch.stack([of_rank(k, 8, 12, gen, dtype) for k in known])
    assert effective_rank(batch).tolist() == known
    assert effective_rank(batch).tolist() == torch.linalg.matrix_rank(batch, rtol=1e-3).tolist()
    for matrix, k in zip(batch, known):
        assert int(effective_rank(matrix)) == k == int(torch.linalg.matrix_rank(matrix, rtol=1e-3))
    assert int(effective_rank(torch.zeros(4, 6, dtype=dtype))) == 0


def test_the_threshold_is_relative_to_the_largest_singular_value():
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    sigmas = torch.tensor([10.0, 1.0, 0.05, 0.005, 0.0, 0.0], dtype=torch.float64)
    matrix = u @ torch.diag(sigmas) @ u.T
    for rtol, expected in ((1e-4, 4), (1e-3, 3), (1e-2, 2), (0.2, 1)):
        assert int(effective_rank(matrix, rtol)) == expected == int(torch.linalg.matrix_rank(matrix, rtol=rtol))
        assert int(effective_rank(1e-6 * matrix, rtol)) == expected  # scale-free
    assert threshold_text(1e-3) == "rank = #σ > 0.001·σ_max"
    with pytest.raises(ValueError, match="rtol"):
        effective_rank(matrix, rtol=-1.0)


@pytest.mark.parametrize("a_rank", [5, 2])
def test_low_rank_path_agrees_with_the_explicit_product(a_rank):
    gen = torch.Generator().manual_seed(2)
    a = of_rank(a_rank, 20, 5, gen)  # (in, r), full or rank-deficient
    m = torch.stack([of_rank(k, 5, 30, gen) for k in (0, 1, 2, 3, 4, 5)])  # (S, r, out), one of each rank
    explicit = torch.linalg.matrix_rank(0.5 * a @ m, rtol=1e-3)
    assert low_rank_effective_rank(a, m, scaling=0.5).tolist() == explicit.tolist()
    assert explicit.tolist() == [min(k, a_rank) for k in (0, 1, 2, 3, 4, 5)]
    assert int(low_rank_effective_rank(a, m[3])) == int(torch.linalg.matrix_rank(a @ m[3], rtol=1e-3))
    assert int(low_rank_effective_rank(a, m[3], scaling=0.0)) == 0

    lora_a = torch.stack([of_rank(k, 20, 4, gen) for k in (4, 2, 1, 4)])
    lora_b = torch.stack([of_rank(k, 4, 30, gen) for k in (4, 4, 3, 0)])
    expected = torch.linalg.matrix_rank(lora_a @ lora_b, rtol=1e-3).tolist()
    assert lora_layer_ranks(lora_a, lora_b, scaling=2.0).tolist() == expected == [4, 2, 1, 0]


def test_lily_sample_ranks_agree_with_the_mixed_update():
    gen = torch.Generator().manual_seed(3)
    a_g = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 4, 24, generator=gen, dtype=torch.float64)
    b[2] = -(b[0] + b[1]) + of_rank(1, 4, 24, gen)  # the uniform mix cancels all but a rank-1 part
    weights = torch.softmax(torch.randn(7, 3, generator=gen, dtype=torch.float64), -1)
    explicit = torch.linalg.matrix_rank(torch.einsum("ir,se,ero->sio", a_g, weights, b), rtol=1e-3)
    assert lily_sample_ranks(a_g, b, weights).tolist() == explicit.tolist() == [4] * 7
    assert lily_sample_ranks(a_g, b).tolist() == [1]  # None: the uniform mix
    assert lily_sample_ranks(a_g, b[:1], weights[:, :1]).tolist() == [4] * 7  # one B: the mix is 1
    with pytest.raises(ValueError, match="num_B=3"):
        lily_sample_ranks(a_g, b, weights[:, :2])


# ----------------------------------------------------------------------------------------------
# Per-sample router mixes


def test_recorder_keeps_each_samples_mean_mix():
    recorder = RouterRecorder(per_sample=True)
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], [[0.2, 0.8], [0.4, 0.6], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    recorder.add("tok", weights, mask)  # (N, T, E): mean over valid tokens
    recorder.add("seq", torch.tensor([[0.3, 0.7], [0.6, 0.4]]), mask)  # (N, E): the rows
    recorder.batch_size = 3
    recorder.add("batch", torch.tensor([0.25, 0.75]), None)  # (E,): repeated per sample
    samples = recorder.samples
    torch.testing.assert_close(samples["tok"], torch.tensor([[0.5, 0.5], [0.3, 0.7]]))
    torch.testing.assert_close(samples["seq"], torch.tensor([[0.3, 0.7], [0.6, 0.4]]))
    torch.testing.assert_close(samples["batch"], torch.tensor([[0.25, 0.75]] * 3))
    torch.testing.assert_close(recorder.means()["tok"], torch.tensor([2.1, 2.9]) / 5)  # totals unchanged
    assert RouterRecorder().samples == {}  # off by default


def test_per_sample_ranks_differ_from_the_uniform_mix():
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily_ssm.LilyConfig(["in_proj"], r=4, num_A=1, num_B=2))
    randomise_adapter(model, std=1.0)
    pool = model.lily_ssm_adapter.pools["in_proj"]
    with torch.no_grad():  # B_1 = -B_0 + (rank 1): the uniform mix has rank 1, any other mix rank 4
        pool.B[1] = -pool.B[0] + of_rank(1, 4, pool.B.shape[2], torch.Generator().manual_seed(4), torch.float32)
    ids = torch.randint(2, 64, (5, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad(), record_router_weights(model, per_sample=True) as recorder:
        model(input_ids=ids, attention_mask=mask)
    slot = pool.group.modules[0]
    mixes = recorder.samples[slot.key]
    assert mixes.shape == (5, 2) and (mixes - 0.5).abs().min() > 1e-2
    torch.testing.assert_close(mixes.sum(-1), torch.ones(5))
    per_sample = lily_sample_ranks(pool.A[0], pool.B, mixes, pool.config.scaling)
    assert per_sample.tolist() == [4] * 5 and lily_sample_ranks(pool.A[0], pool.B).tolist() == [1]


# ----------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A Lily adapter (with experiment.yaml) and a LoRA adapter on a tiny base with a tokenizer, and test data."""
    from lily_ssm.data.synthetic import write_synthetic_commonsense
    from lily_ssm.models.loading import load_model_and_tokenizer
    from lily_ssm.models.tiny import build_quickstart_base

    root = tmp_path_factory.mktemp("inspect")
    base = str(build_quickstart_base(root / "base", log=lambda *_: None, steps=0, corpus_size=32, hidden=32,
                                     layers=3))
    data = write_synthetic_commonsense(root / "data", train_per_task=2, test_per_task=2)
    folders = {}
    for name, config in (
        ("lily", lily_ssm.LilyConfig(["in_proj", "dt_proj"], r=4, num_A=2, num_B=3,
                                     overrides={"dt_proj": {"num_B": 1}})),
        ("lora", lily_ssm.LoraConfig(["in_proj", "x_proj"], r=2, alpha=4)),
    ):
        model, _ = load_model_and_tokenizer(base, "float32")
        lily_ssm.apply_adapter(model, config)
        randomise_adapter(model)
        folders[name] = lily_ssm.save_adapter(model, root / name)
    experiment = {"model": {"name_or_path": base, "dtype": "float32"}, "data": {"cutoff_len": 64}}
    (folders["lily"] / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    return {"base": base, "data": data, **folders}


def test_lily_with_data_and_lora_overlaid(saved, tmp_path):
    messages = []
    summary = inspect_adapters([saved["lily"], saved["lora"]], tmp_path, data=str(saved["data"]["root"]), limit=6,
                               batch_size=4, log=messages.append)
    for name in ("effective_rank.png", "lily_router_weights.png", "lily_structure.png"):
        assert_png(tmp_path / name)
    assert not list(tmp_path.glob("lora_*.png"))  # LoRA has no routers or shared experts to draw
    written = json.loads((tmp_path / "inspect.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["threshold"] == "rank = #σ > 0.001·σ_max"
    lily = written["adapters"]["lily"]
    assert lily["samples"] == 6
    in_proj = lily["targets"]["in_proj"]
    assert [row["a_group"] for row in in_proj["layers"]] == [0, 0, 1]
    assert {row["mix"] for row in in_proj["layers"]} == {"per-sample"}
    assert all(row["samples"] == 6 and 1 <= row["min"] <= row["median"] <= row["max"] <= 4 for row in in_proj["layers"])
    assert len(in_proj["router_weights"]) == 3 and in_proj["b_usage"]["kind"].startswith("mean router weight")
    assert lily["targets"]["dt_proj"]["layers"][0]["mix"] == "single B"
    lora = written["adapters"]["lora"]["targets"]
    assert set(lora) == {"in_proj", "x_proj"} and all(row["median"] == 2 for row in lora["in_proj"]["layers"])
    assert any("--data is not used" in m for m in messages)


def test_without_data_no_model_is_loaded(saved, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("inspect loaded a model without data")

    monkeypatch.setattr("lily_ssm.models.loading.load_model_and_tokenizer", no_model)
    summary = inspect_adapters([saved["lily"]], tmp_path, log=lambda *_: None)
    assert_png(tmp_path / "effective_rank.png")
    assert_png(tmp_path / "structure.png")
    assert not (tmp_path / "router_weights.png").exists()
    targets = summary["adapters"]["lily"]["targets"]
    assert {row["mix"] for row in targets["in_proj"]["layers"]} == {"uniform"}
    assert targets["in_proj"]["b_usage"]["kind"] == "‖B_i‖_F (no data given)"
    inspect_adapters([saved["lora"]], tmp_path / "lora", data=str(saved["data"]["root"]), log=lambda *_: None)
    assert_png(tmp_path / "lora" / "effective_rank.png")


def test_vtab_task_folder(tmp_path):
    from lily_ssm.config.vtab import load_vtab_config
    from lily_ssm.data.vtab import write_fake_vtab
    write_fake_vtab(tmp_path / "vtab", "eurosat", classes=2, per_class=1, image_size=32, per_class_test=2)
    experiment = load_vtab_config(TINY_VIM, [f"data.root={tmp_path / 'vtab'}", f"training.output_dir={tmp_path}"])
    model = experiment.build_model("eurosat")
    randomise_adapter(model)
    folder = lily_ssm.save_adapter(model, tmp_path / "eurosat")
    result = {"task": "eurosat", "config": {"model": asdict(experiment.model), "adapter": experiment.adapter}}
    (folder / "result.json").write_text(json.dumps(result))
    summary = inspect_adapters([folder], tmp_path / "out", data=str(tmp_path / "vtab"), limit=5, batch_size=3,
                               log=lambda *_: None)
    for name in ("effective_rank.png", "router_weights.png", "structure.png"):
        assert_png(tmp_path / "out" / name)
    targets = summary["adapters"]["eurosat"]["targets"]
    assert summary["adapters"]["eurosat"]["samples"] == 4  # 2 classes x 2 test images: fewer than the limit
    assert [row["a_group"] for row in targets["in_proj"]["layers"]] == [0, 1, 2, 3]  # num_A = L
    assert targets["dt_proj"]["r"] == 2 and targets["dt_proj"]["router_weights"] is None

    assert cli(["inspect", str(folder), "--data", str(tmp_path)]) == 2  # not the VTAB root


def test_cli(saved, tmp_path, capsys):
    folder = tmp_path / "lora"
    shutil.copytree(saved["lora"], folder)
    assert cli(["inspect", str(folder), "--rtol", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"figures written to {folder / 'inspect'}/" in out and "effective_rank.png" in out
    assert out.count("effective_rank.png") == 1, out  # said once, not twice in two wordings
    assert json.loads((folder / "inspect" / "inspect.json").read_text())["rtol"] == 0.5
    assert_png(folder / "inspect" / "effective_rank.png")


def test_errors(saved, tmp_path, capsys):
    assert cli(["inspect", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err

    assert cli(["inspect", str(saved["lily"]), "--data", str(tmp_path / "nothing.json"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nothing.json does not exist" in err and "builtin:synthetic-commonsense" in err

    old = tmp_path / "old"
    shutil.copytree(saved["lora"], old)
    meta = json.loads((old / "adapter_config.json").read_text())
    del meta["groups"]
    (old / "adapter_config.json").write_text(json.dumps(meta))
    assert cli(["inspect", str(old)]) == 2
    assert "no 'groups' layout" in capsys.readouterr().err

    bare = tmp_path / "bare"
    shutil.copytree(saved["lily"], bare, ignore=shutil.ignore_patterns("experiment.yaml"))
    assert cli(["inspect", str(bare), "--data", str(saved["data"]["root"])]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "experiment.yaml" in err
    assert cli(["inspect", str(bare), "--data", str(saved["data"]["root"]), "--model", saved["base"], "--limit", "2",
                "--out", str(tmp_path / "with-model")]) == 0
    assert_png(tmp_path / "with-model" / "router_weights.png")

    with pytest.raises(ValueError, match="rtol"):
        inspect_adapters([saved["lora"]], tmp_path, rtol=-1.0)
    with pytest.raises(FileNotFoundError, match="test.json"):
        inspect_adapters([saved["lily"]], tmp_path, data=str(tmp_path), log=lambda *_: None)

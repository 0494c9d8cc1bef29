"""save_adapter / load_adapter: round trips, file format, mismatches, damaged files, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from conftest import randomise_adapter, tiny_mamba
from safetensors import safe_open
from torch import nn

import lily_ssm
from lily_ssm import AdapterLoadError, LilyConfig, LoraConfig
from lily_ssm.persistence import CONFIG_NAME, WEIGHTS_NAME
from lily_ssm.tuners import get_adapter_state
from lily_ssm.tuners.model import AdapterState

TARGETS = ["in_proj", "x_proj", "dt_proj", "out_proj"]


def lily_config(**kw) -> LilyConfig:
    values = dict(targets=list(TARGETS), r=4, num_A=2, num_B=3, scaling=0.5, routing="causal",
                  overrides={"dt_proj": {"r": 2, "num_B": 1}, "out_proj": {"num_A": 3}})
    values.update(kw)
    return LilyConfig(**values)


def lora_config(**kw) -> LoraConfig:
    values = dict(targets=list(TARGETS), r=3, alpha=6.0, overrides={"x_proj": {"r": 2, "alpha": 3.0}})
    values.update(kw)
    return LoraConfig(**values)


def input_ids(batch: int = 2, length: int = 7, vocab: int = 64, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=gen)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def adapted(kind: str = "falcon", config=None, layers: int = 3, seed: int = 0) -> nn.Module:
    model = lily_ssm.apply_adapter(tiny_mamba(kind, layers=layers, seed=seed), config or lily_config())
    randomise_adapter(model)
    return model


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """``model`` is still a plain base model: no adapter, nothing frozen, nothing wrapped, same weights."""
    assert not hasattr(model, "lily_ssm_adapter")
    assert all(p.requires_grad for p in model.parameters())
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("kind", ["falcon", "mamba"])
def test_lily_round_trip_identical_logits(tmp_path, kind):
    model = adapted(kind)
    ids = input_ids()
    expected = logits(model, ids)
    lily_ssm.save_adapter(model, tmp_path / "ad")

    fresh = tiny_mamba(kind, seed=0)
    loaded = lily_ssm.load_adapter(fresh, tmp_path / "ad")
    assert loaded is fresh
    assert torch.equal(logits(loaded, ids), expected)

    # The adapter really did something (B is non-zero), so the comparison is meaningful.
    assert not torch.allclose(logits(tiny_mamba(kind, seed=0), ids), expected)


def test_lily_round_trip_restores_config_and_tensors(tmp_path):
    config = lily_config(routing="causal", router="group", dropout=0.1)
    model = adapted(config=config)
    lily_ssm.save_adapter(model, tmp_path)
    loaded = lily_ssm.load_adapter(tiny_mamba(seed=0), tmp_path)

    state = get_adapter_state(loaded)
    assert state.config == config
    assert state.config.to_dict() == config.to_dict()
    assert state.config.overrides == {"dt_proj": {"r": 2, "num_B": 1}, "out_proj": {"num_A": 3}}
    # Per-target overrides took effect in the rebuilt pools.
    assert state.pools["dt_proj"].config.r == 2 and state.pools["dt_proj"].config.num_B == 1
    assert state.pools["dt_proj"].router is None
    assert state.pools["out_proj"].config.num_A == 3
    saved = get_adapter_state(model).tensors()
    restored = state.tensors()
    assert set(saved) == set(restored)
    for key in saved:
        assert torch.equal(saved[key], restored[key]), key
    # Loaded adapter parameters are trainable, the base is frozen.
    assert all(p.requires_grad for p in state.parameters())
    base = [p for n, p in loaded.named_parameters() if not n.startswith("lily_ssm_adapter.")]
    assert base and not any(p.requires_grad for p in base)


@pytest.mark.parametrize("kind", ["falcon", "mamba"])
def test_lora_round_trip_identical_logits(tmp_path, kind):
    config = lora_config()
    model = adapted(kind, config=config)
    ids = input_ids()
    expected = logits(model, ids)
    lily_ssm.save_adapter(model, tmp_path)

    loaded = lily_ssm.load_adapter(tiny_mamba(kind, seed=0), tmp_path)
    assert torch.equal(logits(loaded, ids), expected)
    assert get_adapter_state(loaded).config == config
    assert get_adapter_state(loaded).pools["x_proj"].config.r == 2


def test_regex_targets_round_trip(tmp_path):
    config = lily_config(targets=r"backbone\.layers\.[0-1]\.mixer\.(in_proj|dt_proj)", overrides={})
    model = adapted(config=config)
    ids = input_ids()
    expected = logits(model, ids)
    lily_ssm.save_adapter(model, tmp_path)
    loaded = lily_ssm.load_adapter(tiny_mamba(seed=0), tmp_path)
    assert get_adapter_state(loaded).config == config
    assert torch.equal(logits(loaded, ids), expected)


def test_load_onto_already_adapted_model_with_same_config(tmp_path):
    """Documented in load_adapter: 'a base model, or one already adapted with the same config'."""
    config = lily_config()
    model = adapted(config=config)
    ids = input_ids()
    expected = logits(model, ids)
    lily_ssm.save_adapter(model, tmp_path)

    target = lily_ssm.apply_adapter(tiny_mamba(seed=0), lily_config())  # fresh init, B = 0
    assert not torch.equal(logits(target, ids), expected)
    lily_ssm.load_adapter(target, tmp_path)
    assert torch.equal(logits(target, ids), expected)
    # The existing adapter was refilled, not replaced by a second one.
    assert sum(1 for m in target.modules() if isinstance(m, AdapterState)) == 1


def test_load_onto_model_with_a_different_adapter_fails(tmp_path):
    lily_ssm.save_adapter(adapted(config=lily_config()), tmp_path)
    target = lily_ssm.apply_adapter(tiny_mamba(seed=0), lily_config(r=8))
    with pytest.raises(AdapterLoadError, match="different adapter"):
        lily_ssm.load_adapter(target, tmp_path)


# --------------------------------------------------------------------------------------------------
# File format


def wide_model(layers: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    torch.manual_seed(0)
    config = FalconMambaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                               state_size=8, time_step_rank=8, conv_kernel=4)
    return FalconMambaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("method", ["lily", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_file_size_is_parameters_times_bytes(tmp_path, method, dtype):
    """Half-precision bases get fp32 adapter weights (so small updates are not rounded away)."""
    config = (LilyConfig(targets=list(TARGETS), r=16, num_A=2, num_B=3) if method == "lily"
              else LoraConfig(targets=list(TARGETS), r=16, alpha=16.0))
    model = lily_ssm.apply_adapter(wide_model(dtype=dtype), config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lily_ssm.parameter_report(model).trainable
    lily_ssm.save_adapter(model, tmp_path)

    size = (tmp_path / WEIGHTS_NAME).stat().st_size
    data = trainable * 4  # fp32 adapter weights, whatever the base dtype
    assert size >= data
    assert abs(size - data) / data < 0.05, (size, data)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        assert all(handle.get_tensor(k).dtype == torch.float32 for k in handle.keys())


def test_shared_tensors_stored_once(tmp_path):
    config = LilyConfig(targets=list(TARGETS), r=4, num_A=2, num_B=3, overrides={"dt_proj": {"num_B": 1}})
    model = lily_ssm.apply_adapter(tiny_mamba(layers=4), config)
    lily_ssm.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        keys = set(handle.keys())
        shapes = {k: tuple(handle.get_tensor(k).shape) for k in keys}
    # 3 tensors (A, B, router) per type with num_B > 1, 2 (A, B) for dt_proj with a single B.
    assert len(keys) == 3 * 3 + 2
    assert keys == {f"{t}.{k}" for t in ("in_proj", "x_proj", "out_proj") for k in ("A", "B", "router")} | {
        "dt_proj.A", "dt_proj.B"}
    # hidden 16, intermediate 32, state 4, dt rank 4; 4 layers, router per layer
    assert shapes["in_proj.A"] == (2, 16, 4)
    assert shapes["in_proj.B"] == (3, 4, 64)
    assert shapes["in_proj.router"] == (4, 3, 4)
    assert shapes["dt_proj.B"] == (1, 4, 32)
    # The file holds the pools, not one copy per layer.
    per_layer = sum(p.numel() for p in get_adapter_state(model).parameters())
    stored = sum(torch.Size(s).numel() for s in shapes.values())
    assert stored == per_layer


def test_config_json_is_human_readable(tmp_path):
    model = adapted(config=lily_config())
    lily_ssm.save_adapter(model, tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    assert "\n  " in text  # indented, one key per line
    meta = json.loads(text)
    assert meta["config"]["method"] == "lily"
    assert meta["config"]["targets"] == TARGETS
    assert meta["config"]["overrides"]["dt_proj"] == {"r": 2, "num_B": 1}
    assert meta["base_model"]["architecture"] == "FalconMambaForCausalLM"
    assert meta["base_model"]["dimensions"]["hidden_size"] == 16
    assert meta["modules"]["backbone.layers.0.mixer.in_proj"] == [16, 64]
    assert meta["weights_sha256"] == hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest()
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        assert handle.metadata()["method"] == "lily"

    lily_ssm.save_adapter(adapted(config=lora_config()), tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())["config"]["method"] == "lora"


# --------------------------------------------------------------------------------------------------
# Mismatched base models


@pytest.mark.parametrize(
    "make_target, needle",
    [
        (lambda: wide_model(layers=3), "hidden_size"),
        (lambda: tiny_mamba("falcon", layers=4, seed=0), "num_hidden_layers"),
        (lambda: tiny_mamba("mamba", seed=0), "MambaForCausalLM"),
        (lambda: tiny_mamba("falcon", seed=0, vocab=80), "vocab_size"),
    ],
    ids=["hidden_size", "layers", "architecture", "vocab"],
)
def test_mismatched_model_fails_and_is_left_unmodified(tmp_path, make_target, needle):
    lily_ssm.save_adapter(adapted(config=lily_config()), tmp_path)
    target = make_target()
    before = snapshot(target)
    with pytest.raises(AdapterLoadError) as info:
        lily_ssm.load_adapter(target, tmp_path)
    message = str(info.value)
    assert needle in message
    assert "different base model" in message
    assert_untouched(target, before)


def test_mamba_vs_falcon_message_names_both_architectures(tmp_path):
    lily_ssm.save_adapter(adapted("mamba", config=lora_config()), tmp_path)
    target = tiny_mamba("falcon", seed=0)
    before = snapshot(target)
    with pytest.raises(AdapterLoadError) as info:
        lily_ssm.load_adapter(target, tmp_path)
    assert "MambaForCausalLM" in str(info.value) and "FalconMambaForCausalLM" in str(info.value)
    assert_untouched(target, before)


# --------------------------------------------------------------------------------------------------
# Damaged or missing files


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "adapter"
    lily_ssm.save_adapter(adapted(config=lily_config()), folder)
    return folder


def _load_fresh_expecting(folder, exc_type, needle):
    target = tiny_mamba(seed=0)
    before = snapshot(target)
    with pytest.raises(exc_type) as info:
        lily_ssm.load_adapter(target, folder)
    assert needle in str(info.value), str(info.value)
    assert_untouched(target, before)
    return info.value


def test_truncated_weights_file(saved):
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _load_fresh_expecting(saved, AdapterLoadError, WEIGHTS_NAME)


def test_truncated_weights_with_matching_checksum(saved):
    """Even if the checksum was rewritten, the safetensors parser rejects a truncated file cleanly."""
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()[:-37]
    path.write_bytes(data)
    meta = json.loads((saved / CONFIG_NAME).read_text())
    meta["weights_sha256"] = hashlib.sha256(data).hexdigest()
    (saved / CONFIG_NAME).write_text(json.dumps(meta))
    _load_fresh_expecting(saved, AdapterLoadError, WEIGHTS_NAME)


@pytest.mark.parametrize("where", ["header", "data", "last"])
def test_byte_flipped_weights_file(saved, where):
    path = saved / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    index = {"header": 20, "data": len(data) // 2, "last": len(data) - 1}[where]
    data[index] ^= 0x01
    path.write_bytes(bytes(data))
    error = _load_fresh_expecting(saved, AdapterLoadError, WEIGHTS_NAME)
    assert "checksum" in str(error)


def test_truncated_config_file(saved):
    path = saved / CONFIG_NAME
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    _load_fresh_expecting(saved, AdapterLoadError, CONFIG_NAME)


def test_config_with_unknown_method(saved):
    path = saved / CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["config"]["method"] = "dora"
    path.write_text(json.dumps(meta))
    _load_fresh_expecting(saved, AdapterLoadError, "dora")


def test_config_with_invalid_field(saved):
    path = saved / CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["config"]["routing"] = "sideways"
    path.write_text(json.dumps(meta))
    _load_fresh_expecting(saved, AdapterLoadError, CONFIG_NAME)


@pytest.mark.parametrize(
    "field, value",
    [("r", 8), ("num_B", 1), ("num_A", 2), ("router", "layer")],
)
def test_config_inconsistent_with_weights(tmp_path, field, value):
    """adapter_config.json edited (weights and their checksum intact): the config's adapter no longer
    matches the stored tensors. Loading must fail with AdapterLoadError and leave the model untouched
    ("Nothing is changed if the adapter does not fit the model"), never silently broadcast tensors."""
    config = LilyConfig(targets=["in_proj"], r=4, num_A=1, num_B=3, router="global")
    lily_ssm.save_adapter(adapted(config=config), tmp_path)
    path = tmp_path / CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["config"][field] = value
    path.write_text(json.dumps(meta))
    _load_fresh_expecting(tmp_path, AdapterLoadError, "in_proj")


@pytest.mark.parametrize("name", [WEIGHTS_NAME, CONFIG_NAME])
def test_missing_file(saved, name):
    (saved / name).unlink()
    _load_fresh_expecting(saved, FileNotFoundError, name)


def test_missing_folder(tmp_path):
    _load_fresh_expecting(tmp_path / "nowhere", FileNotFoundError, "nowhere")


def test_load_errors_are_value_errors():
    assert issubclass(AdapterLoadError, ValueError)


# --------------------------------------------------------------------------------------------------
# Atomic writes


def test_save_leaves_no_temporary_files(tmp_path):
    folder = tmp_path / "nested" / "adapter"  # created as needed
    result = lily_ssm.save_adapter(adapted(config=lily_config()), folder)
    assert os.fspath(result) == os.fspath(folder)
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert sorted(os.listdir(tmp_path / "nested")) == ["adapter"]


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the result must be readable like any new file."""
    mask = os.umask(0o022)
    try:
        import importlib

        import lily_ssm.utils.atomic as atomic

        importlib.reload(atomic)  # the mode is read from the umask when the module loads
        atomic.write_atomic(tmp_path / "f.txt", "x")
        assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
        importlib.reload(atomic)


def test_save_over_existing_adapter_replaces_it(tmp_path):
    ids = input_ids()
    lily_ssm.save_adapter(adapted(config=lora_config()), tmp_path)
    first_sha = json.loads((tmp_path / CONFIG_NAME).read_text())["weights_sha256"]

    lily_model = adapted(config=lily_config())
    randomise_adapter(lily_model, seed=7)
    expected = logits(lily_model, ids)
    lily_ssm.save_adapter(lily_model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["config"]["method"] == "lily"
    assert meta["weights_sha256"] != first_sha

    loaded = lily_ssm.load_adapter(tiny_mamba(seed=0), tmp_path)
    assert get_adapter_state(loaded).config.method == "lily"
    assert torch.equal(logits(loaded, ids), expected)

    # Saving again over the same folder still loads (the header's metadata order may differ between
    # processes, since safetensors keeps it in a hash map, so bytes are not compared).
    lily_ssm.save_adapter(lily_model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert torch.equal(logits(lily_ssm.load_adapter(tiny_mamba(seed=0), tmp_path), ids), expected)


def test_modules_to_save_train_and_round_trip_with_the_adapter(tmp_path):
    from lily_ssm.models.vim import VimConfig, VisionMamba

    def vim(seed):
        torch.manual_seed(seed)
        return VisionMamba(VimConfig(img_size=16, patch_size=8, embed_dim=16, depth=2, num_classes=3)).eval()

    config = LilyConfig(["in_proj", "dt_proj", "dt_proj_b"], r=2, num_A=2, num_B=2, routing="token", router="global",
                        modules_to_save=["head"])
    model = lily_ssm.apply_adapter(vim(0), config)
    assert model.head.weight.requires_grad and not model.patch_embed.proj.weight.requires_grad
    assert lily_ssm.parameter_report(model).other_trainable == 16 * 3 + 3
    randomise_adapter(model)
    with torch.no_grad():
        model.head.weight.normal_()
    pixels = torch.randn(2, 3, 16, 16)
    lily_ssm.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        assert {"modules_to_save.head.weight", "modules_to_save.head.bias"} <= set(handle.keys())
    loaded = lily_ssm.load_adapter(vim(0), tmp_path)  # same base, fresh head: the head comes from the file
    with torch.no_grad():
        assert torch.equal(loaded(pixels), model(pixels))
    with pytest.raises(ValueError, match="modules_to_save entry 'classifier' matches no module"):
        lily_ssm.apply_adapter(vim(0), LilyConfig(["in_proj"], r=2, num_A=1, num_B=2, modules_to_save=["classifier"]))

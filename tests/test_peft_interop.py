"""PEFT adapter folders in and out, with PEFT itself as the oracle in both directions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import randomise_adapter, tiny_llama, tiny_mamba
from safetensors.torch import load_file, save_file

import lily_ssm
from lily_ssm.cli import main
from lily_ssm.persistence import AdapterLoadError

peft = pytest.importorskip("peft")

# PEFT 0.21 calls a transformers API that transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 64, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as in generation
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**_inputs()).logits


def _peft_folder(tmp_path: Path, base: torch.nn.Module, config, name: str = "peft") -> tuple[Path, torch.Tensor]:
    """A PEFT adapter with random values everywhere (PEFT zero-initialises B), saved; and PEFT's logits."""
    model = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_" in pname or "lily_" in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            elif param.requires_grad:  # modules_to_save copies
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder, _logits(model)


LORA_CASES = {
    "mamba-in-x": (lambda: tiny_mamba("falcon"),
                   dict(r=4, lora_alpha=8, target_modules=["in_proj", "x_proj"])),
    "mamba-patterns-rslora": (lambda: tiny_mamba("mamba"),
                              dict(r=4, lora_alpha=8, target_modules=["in_proj", "x_proj"], use_rslora=True,
                                   rank_pattern={"x_proj": 2}, alpha_pattern={"x_proj": 3})),
    "llama-qv-head": (lambda: tiny_llama(layers=2),
                      dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    "llama-some-layers": (lambda: tiny_llama(layers=3),
                          dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2])),
}


@pytest.mark.parametrize("case", LORA_CASES)
def test_peft_lora_folder_loads_with_peft_logits(tmp_path, case):
    make, kwargs = LORA_CASES[case]
    folder, expected = _peft_folder(tmp_path, make(), peft.LoraConfig(**kwargs))
    base_logits = _logits(make())
    assert (expected - base_logits).abs().max() > 1e-2, "the PEFT adapter should change the logits"
    ours = lily_ssm.load_adapter(make(), folder)
    torch.testing.assert_close(_logits(ours), expected, atol=2e-5, rtol=1e-5)
    assert ours.lily_ssm_adapter.config.method == "lora"


@pytest.mark.parametrize("make, targets", [(lambda: tiny_mamba("falcon"), ["in_proj", "x_proj"]),
                                           (lambda: tiny_llama(layers=4), ["q_proj", "v_proj"])],
                         ids=["mamba", "llama"])
def test_peft_lily_folder_loads_with_peft_logits(tmp_path, make, targets):
    folder, expected = _peft_folder(tmp_path, make(), peft.LilyConfig(r=4, stride_A=2, num_B=3,
                                                                        target_modules=targets, scaling=0.5))
    ours = lily_ssm.load_adapter(make(), folder)
    torch.testing.assert_close(_logits(ours), expected, atol=2e-5, rtol=1e-5)
    config = ours.lily_ssm_adapter.config
    assert (config.routing, config.router, config.stride_A, config.num_B) == ("batch", "layer", 2, 3)


def test_peft_dt_proj_adapter_is_live_after_import_and_says_so(tmp_path, caplog):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "dt_proj"])
    model = peft.get_peft_model(tiny_mamba("falcon"), config)
    with torch.no_grad():  # in_proj trained; dt_proj as PEFT leaves it (B = 0: it never got a gradient)
        for pname, param in model.named_parameters():
            if "in_proj.lora_B" in pname:
                param.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "untrained-dt")
    expected = _logits(model)
    with caplog.at_level(logging.WARNING, logger="lily_ssm"):
        ours = lily_ssm.load_adapter(tiny_mamba("falcon"), tmp_path / "untrained-dt")
    assert "never applied it" in caplog.text and "changes nothing until trained" in caplog.text
    torch.testing.assert_close(_logits(ours), expected, atol=2e-5, rtol=1e-5)

    folder, peft_logits = _peft_folder(tmp_path, tiny_mamba("falcon"), config, "trained-dt")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lily_ssm"):
        ours = lily_ssm.load_adapter(tiny_mamba("falcon"), folder)
    assert "outputs differ from PEFT's" in caplog.text
    assert (_logits(ours) - peft_logits).abs().max() > 1e-3  # live here, dead in PEFT


EXPORT_CASES = {
    "mamba-lora": (lambda: tiny_mamba("falcon"),
                   lambda: lily_ssm.LoraConfig(["in_proj", "x_proj"], r=4, alpha=8,
                                               overrides={"x_proj": {"r": 2, "alpha": 3.0}})),
    "llama-lora-head": (lambda: tiny_llama(layers=2),
                        lambda: lily_ssm.LoraConfig(["q_proj", "v_proj", "up_proj"], r=3, alpha=6,
                                                    modules_to_save=["lm_head"])),
    "llama-lora-regex": (lambda: tiny_llama(layers=2),
                         lambda: lily_ssm.LoraConfig(r"model\.layers\.1\.self_attn\.(q|k)_proj", r=2, alpha=2)),
    "mamba-lily": (lambda: tiny_mamba("falcon"),
                   lambda: lily_ssm.LilyConfig(["in_proj"], r=4, num_A=2, num_B=3, stride_A=2, routing="batch",
                                               scaling=0.5)),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_peft_export_loads_in_peft_with_our_logits(tmp_path, case):
    make, config = EXPORT_CASES[case]
    ours = lily_ssm.apply_adapter(make(), config())
    randomise_adapter(ours)
    expected = _logits(ours)
    lily_ssm.save_adapter(ours, tmp_path / "exported", format="peft")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "exported")
    torch.testing.assert_close(_logits(theirs), expected, atol=2e-5, rtol=1e-5)
    # and back: importing the exported folder gives our tensors again
    back = lily_ssm.load_adapter(make(), tmp_path / "exported")
    for key, tensor in ours.lily_ssm_adapter.tensors().items():
        torch.testing.assert_close(back.lily_ssm_adapter.tensors()[key], tensor, atol=0, rtol=0)


@pytest.mark.parametrize("config, reason", [
    (lily_ssm.LoraConfig(["in_proj", "dt_proj"], r=2, alpha=2), "dt_proj.weight directly"),
    (lily_ssm.LoraConfig(["in_proj.x"], r=2, alpha=2), "not a part of a projection"),
    (lily_ssm.LoraConfig(["out_proj"], r=2, alpha=2), "out_proj.weight straight to the kernel"),
    (lily_ssm.LilyConfig(["in_proj"], r=2, num_A=2, num_B=2, stride_A=2), "routing='causal'"),
    (lily_ssm.LilyConfig(["in_proj"], r=2, num_A=2, num_B=2, routing="batch"), "stride_A is not set"),
])
def test_peft_export_refuses_what_peft_cannot_reproduce(tmp_path, config, reason):
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), config)
    with pytest.raises(ValueError, match="PEFT cannot reproduce this adapter") as info:
        lily_ssm.save_adapter(model, tmp_path / "out", format="peft")
    assert reason in str(info.value) and "merge_adapter" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_convert_both_ways_on_the_command_line(tmp_path, capsys):
    base_dir = tmp_path / "base"
    tiny_mamba("falcon").save_pretrained(base_dir)
    folder, expected = _peft_folder(tmp_path, tiny_mamba("falcon"),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "x_proj"]))
    assert main(["convert", "--from-peft", str(folder), str(tmp_path / "ours"), "--model", str(base_dir)]) == 0
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["format_version"] == 1
    torch.testing.assert_close(_logits(lily_ssm.load_adapter(tiny_mamba("falcon"), tmp_path / "ours")), expected,
                               atol=2e-5, rtol=1e-5)
    assert main(["convert", "--to-peft", str(tmp_path / "ours"), str(tmp_path / "theirs"),
                 "--model", str(base_dir)]) == 0
    theirs = peft.PeftModel.from_pretrained(tiny_mamba("falcon"), tmp_path / "theirs")
    torch.testing.assert_close(_logits(theirs), expected, atol=2e-5, rtol=1e-5)
    capsys.readouterr()
    # without --model, the base model comes from the PEFT config; PEFT recorded none here
    assert main(["convert", "--from-peft", str(folder), str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--model" in err


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_peft_folders_lily_ssm_cannot_reproduce_are_refused(tmp_path):
    folder, _ = _peft_folder(tmp_path, tiny_mamba("falcon"), peft.LoraConfig(r=2, lora_alpha=2,
                                                                             target_modules=["in_proj"]))
    _edit_config(folder, use_dora=True)
    with pytest.raises(AdapterLoadError, match="use_dora=true"):
        lily_ssm.load_adapter(tiny_mamba("falcon"), folder)
    _edit_config(folder, use_dora=False, peft_type="IA3")
    with pytest.raises(AdapterLoadError, match="'IA3'; lily-ssm reads PEFT's LORA and LILY"):
        lily_ssm.load_adapter(tiny_mamba("falcon"), folder)
    _edit_config(folder, peft_type="LORA")
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({**tensors, "base_model.model.backbone.norm_f.lora_magnitude": torch.ones(16)},
              folder / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="lora_magnitude"):
        lily_ssm.load_adapter(tiny_mamba("falcon"), folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="a pickle, which lily-ssm never loads"):
        lily_ssm.load_adapter(tiny_mamba("falcon"), folder)
    with pytest.raises(AdapterLoadError, match="backbone.layers.0.mixer.in_proj, .*another base model"):
        save_file(tensors, folder / "adapter_model.safetensors")
        lily_ssm.load_adapter(tiny_llama(layers=2), folder)


def test_peft_lily_with_a_grouping_lily_ssm_cannot_hold_is_refused(tmp_path):
    folder, _ = _peft_folder(tmp_path, tiny_mamba("falcon"), peft.LilyConfig(r=2, stride_A=2, num_B=2,
                                                                             target_modules=["in_proj"]))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.backbone.layers.1.mixer.in_proj.lily_A.weight"  # shares layer 0's A
    save_file({**tensors, key: tensors[key] + 1}, path)
    with pytest.raises(AdapterLoadError, match="lily_A of in_proj group 0 differs between layers"):
        lily_ssm.load_adapter(tiny_mamba("falcon"), folder)


def test_readers_of_lily_ssm_folders_point_peft_folders_to_convert(tmp_path, capsys):
    folder, _ = _peft_folder(tmp_path, tiny_mamba("falcon"), peft.LoraConfig(r=2, lora_alpha=2,
                                                                             target_modules=["in_proj"]))
    from lily_ssm.persistence import check_adapter_folder, read_adapter

    check_adapter_folder(folder)  # eval-commonsense's early check accepts it
    with pytest.raises(AdapterLoadError, match="is a PEFT adapter folder: .*convert --from-peft"):
        read_adapter(folder)
    assert main(["inspect", str(folder), "--out", str(tmp_path / "fig")]) == 2
    assert "convert --from-peft" in capsys.readouterr().err

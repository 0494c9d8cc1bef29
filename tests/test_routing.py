"""Routing that cannot leak: causal by default for causal LMs, sequence / batch refused in causal-LM
training unless opted in, and one definition of sequence routing for training and generation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomise_adapter, tiny_llama, tiny_mamba

import lily_ssm
from lily_ssm.ablation.config import parse_ablation
from lily_ssm.config.experiment import parse_config
from lily_ssm.tuners import get_adapter_state
from lily_ssm.utils.sections import ConfigError

IDS = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(3))
EDIT = 8  # the token that is changed; logits before it must not move


def _model(arch: str, **config):
    """The README's example config (no routing given) on a tiny Falcon-Mamba or LLaMA."""
    targets = ["in_proj"] if arch == "falcon" else ["q_proj", "v_proj"]
    base = tiny_mamba("falcon") if arch == "falcon" else tiny_llama()
    model = lily_ssm.apply_adapter(base, lily_ssm.LilyConfig(targets=targets, r=4, num_A=2, num_B=4, **config))
    randomise_adapter(model, std=0.5)
    return model


def _edited(ids: torch.Tensor) -> torch.Tensor:
    edited = ids.clone()
    edited[:, EDIT] = (ids[:, EDIT] - 2 + 17) % 62 + 2
    return edited


def _earlier_change(model, labels_of=None) -> float:
    """How far the logits before position EDIT move when the token at EDIT changes (train mode)."""
    model.train()
    runs = []
    for ids in (IDS, _edited(IDS)):
        kwargs = {"labels": labels_of(ids)} if labels_of else {}
        runs.append(model(ids, **kwargs).logits[:, :EDIT])
    return (runs[0] - runs[1]).abs().max().item()


@pytest.mark.parametrize("arch", ["falcon", "llama"])
def test_default_routing_is_causal_and_leaks_no_later_token(arch):
    model = _model(arch)
    assert get_adapter_state(model).config.routing == "causal"
    assert _earlier_change(model) == 0.0
    # the same edit does reach earlier logits when the mix pools over the whole sequence
    leaky = _model(arch, routing="sequence", allow_lookahead=True)
    assert _earlier_change(leaky) > 1e-3


def test_auto_routing_is_sequence_for_models_that_are_not_causal_lms():
    from lily_ssm.models.vim import VimConfig, VisionMamba

    vim = VisionMamba(VimConfig(img_size=16, patch_size=8, embed_dim=16, depth=2, num_classes=3))
    lily_ssm.apply_adapter(vim, lily_ssm.LilyConfig(["in_proj"], r=2, num_A=1, num_B=2))
    assert get_adapter_state(vim).config.routing == "sequence"


def test_yaml_without_routing_trains_with_causal_routing(tmp_path):
    raw = {"model": {"name_or_path": "unused"}, "adapter": {"method": "lily", "targets": ["in_proj"], "r": 4,
                                                            "num_A": 2, "num_B": 4},
           "data": {"train_file": "unused.json"}, "training": {"output_dir": str(tmp_path)}}
    adapter = parse_config(raw).adapter_config()
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), adapter)
    lily_ssm.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["config"]["routing"] == "causal"  # the resolved mode is what is recorded


@pytest.mark.parametrize("routing", ["sequence", "batch"])
def test_leaking_routing_is_refused_in_causal_lm_training(routing):
    model = _model("falcon", routing=routing)
    with pytest.raises(ValueError, match="future-token leakage.*later tokens"):
        _earlier_change(model, labels_of=lambda ids: ids)
    model.eval()
    with torch.no_grad():
        model(IDS, labels=IDS)  # scoring in eval mode is not training: allowed
    opted_in = _model("falcon", routing=routing, allow_lookahead=True)
    assert _earlier_change(opted_in, labels_of=lambda ids: ids) > 1e-3  # it leaks, knowingly


def _response_labels(ids: torch.Tensor, prompt: int = 6) -> torch.Tensor:
    return ids.masked_fill(torch.arange(ids.shape[1]) < prompt, -100)


def test_sequence_routing_over_the_prompt_trains_without_leaking():
    """With the prompt's labels at -100, sequence routing pools over the prompt only: editing a response
    token moves no earlier logit, and the training call is accepted."""
    model = _model("falcon", routing="sequence")
    assert _earlier_change(model, labels_of=_response_labels) == 0.0
    model(IDS, labels=_response_labels(IDS)).loss.backward()
    assert all(p.grad is not None for p in model.lily_ssm_adapter.parameters())
    # a batch in which one sample's response starts inside the other's prompt pool is still checked per sample
    labels = _response_labels(IDS)
    labels[1] = IDS[1]
    with pytest.raises(ValueError, match="future-token leakage"):
        model(IDS, labels=labels)


@pytest.mark.parametrize("train", [False, True])
def test_sequence_routing_has_one_definition_for_training_and_generation(train):
    """A forward over prompt + generated tokens, with labels on the generated part, gives exactly the
    logits generate() produced while decoding with the cache."""
    model = _model("falcon", routing="sequence")
    prompt = IDS[:, :7].clone()
    prompt[0, :2] = 0
    mask = (prompt != 0).long()
    model.eval()
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    sequences, steps = out.sequences, torch.stack(out.logits, dim=1)  # steps: (batch, 5, vocab)
    full_mask = torch.cat([mask, torch.ones_like(sequences[:, 7:])], dim=1)
    labels = sequences.masked_fill(torch.arange(sequences.shape[1]) < 7, -100)
    model.train(train)
    with torch.no_grad():
        logits = model(sequences, attention_mask=full_mask, labels=labels).logits[:, 6:-1]
    torch.testing.assert_close(logits, steps, atol=1e-5, rtol=1e-5)


def _experiment(routing: str, train_on_inputs: bool, **adapter) -> dict:
    return {"model": {"name_or_path": "unused"},
            "adapter": {"method": "lily", "targets": ["in_proj"], "r": 4, "num_A": 2, "num_B": 4, "routing": routing,
                        **adapter},
            "data": {"train_file": "unused.json", "train_on_inputs": train_on_inputs},
            "training": {"output_dir": "unused"}}


@pytest.mark.parametrize("routing,train_on_inputs,refused", [
    ("batch", False, True), ("batch", True, True), ("sequence", True, True), ("sequence", False, False),
    ("causal", True, False), ("token", True, False),
])
def test_train_config_refuses_leaking_routing_before_loading_a_model(routing, train_on_inputs, refused):
    raw = _experiment(routing, train_on_inputs)
    if refused:
        with pytest.raises(ConfigError, match=f"routing='{routing}'.*later tokens"):
            parse_config(raw)
        parse_config(_experiment(routing, train_on_inputs, allow_lookahead=True))  # the explicit opt-in
    else:
        parse_config(raw)


def test_cli_train_refusal_is_one_line(tmp_path, capsys):
    import yaml

    from lily_ssm.cli import main

    path = tmp_path / "leaky.yaml"
    path.write_text(yaml.safe_dump(_experiment("batch", True)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "allow_lookahead" in err and "leaky.yaml" in err


def test_ablation_refuses_a_leaking_routing_arm_before_anything_trains():
    raw = {"ablation": {"output_dir": "unused", "budget": 1000, "methods": ["lily"], "target_sets": ["in"],
                        "routing": ["causal", "batch"]},
           "model": {"name_or_path": "unused"}, "data": {"train_file": "unused.json", "train_on_inputs": False},
           "training": {}, "evaluation": {"data_root": "unused"}}
    with pytest.raises(ConfigError, match="ablation.routing has 'batch'"):
        parse_ablation(raw)
    raw["ablation"]["routing"] = ["causal", "sequence"]  # pools over the prompt: safe without input training
    parse_ablation(raw)

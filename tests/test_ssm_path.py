"""Which scan runs is said in one accurate line, and transformers' own Mamba scan never runs under lily-ssm
(its "falling back to its reference PyTorch implementation" message described a path we do not take)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_mamba

import lily_ssm
from lily_ssm.cli import main as cli
from lily_ssm.models.loading import load_model_and_tokenizer
from lily_ssm.ops import kernels


@pytest.fixture
def fresh_announcements(monkeypatch):
    monkeypatch.setattr(kernels, "_announced", set())


def test_a_loaded_base_runs_lily_ssm_mixers_without_an_adapter(tmp_path):
    """Prefill and cached decoding of a base loaded by lily-ssm go through lily-ssm's own dispatch (references
    standing in for the kernels, counted), in every mixer: transformers' own scan does not run."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from lily_ssm.modules import owned_forward
    from lily_ssm.ops import conv as conv_ops
    from lily_ssm.ops import scan as scan_ops

    tiny_mamba("falcon").save_pretrained(tmp_path / "base")
    vocab = {f"w{i}": i for i in range(64)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w1")),
                            eos_token="w0").save_pretrained(tmp_path / "base")
    model, _ = load_model_and_tokenizer(str(tmp_path / "base"), dtype="float32")
    mixers = [m for m in model.modules() if owned_forward(m) is not None]
    assert mixers and all("forward" in m.__dict__ for m in mixers)
    calls: dict[str, int] = {}

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return run

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        return scan_ops.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    ids = torch.randint(2, 64, (2, 7))
    with torch.no_grad(), kernels.override(
            selective_scan_fn=counted("scan", scan), causal_conv1d_fn=counted("conv", conv_ops.causal_conv1d_ref),
            selective_state_update=counted("update", scan_ops.selective_state_update_ref),
            causal_conv1d_update=counted("conv_update", conv_ops.causal_conv1d_update_ref)):
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # prefill + cached decoding
    layers = len(mixers)
    assert calls == {"scan": layers, "conv": layers, "update": 2 * layers, "conv_update": 2 * layers}
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj"], r=2, num_A=1, num_B=2))
    with torch.no_grad():
        model(ids)


def test_the_first_dispatch_on_a_device_logs_one_line(fresh_announcements, caplog):
    model = tiny_mamba("falcon")
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj"], r=2, num_A=1, num_B=2))
    with caplog.at_level(logging.INFO, logger="lily_ssm"), torch.no_grad():
        model(torch.randint(2, 64, (1, 5)))
        model(torch.randint(2, 64, (1, 5)))
    lines = [r.getMessage() for r in caplog.records if r.name == "lily_ssm"]
    assert lines == ["SSM path on cpu: lily-ssm's PyTorch scans and convolution (the mamba-ssm and causal-conv1d "
                     "kernels run on CUDA tensors only)"]


def test_the_cuda_line_names_what_is_missing(monkeypatch):
    present = {"selective_scan_fn", "selective_scan_cuda", "mamba_chunk_scan_combined", "selective_state_update"}
    monkeypatch.setattr(kernels, "get", lambda name: object() if name in present else None)
    assert kernels.describe_path("cuda") == (
        "SSM path on cuda: lily-ssm's PyTorch code for causal_conv1d_fn, causal_conv1d_update (causal-conv1d not "
        "importable: pip install 'lily-ssm[cuda]'); the other kernels run")
    present.clear()
    assert "(causal-conv1d and mamba-ssm not importable" in kernels.describe_path("cuda")
    assert not kernels.describe_path("cuda").endswith("the other kernels run")
    present.update(kernels.KERNELS)
    assert kernels.describe_path("cuda") == "SSM path on cuda: the mamba-ssm scan kernels and causal-conv1d"


def test_commands_print_the_line_once_on_stderr(tmp_path, capsys, monkeypatch):
    from lily_ssm.data.synthetic import write_synthetic_commonsense
    from lily_ssm.models.tiny import build_quickstart_base

    base = build_quickstart_base(tmp_path / "base", log=lambda *_: None, steps=1, corpus_size=8, hidden=16, layers=1)
    data = write_synthetic_commonsense(tmp_path / "data", train_per_task=1, test_per_task=2)
    monkeypatch.setattr(kernels, "_announced", set())  # building the base ran forwards already
    assert cli(["eval-commonsense", "--model", str(base), "--data-root", data["root"], "--tasks", "boolq,piqa",
                "--protocol", "clean"]) == 0
    err = capsys.readouterr().err
    assert err.count("SSM path on cpu: lily-ssm's PyTorch scans") == 1
    assert "falling back" not in err

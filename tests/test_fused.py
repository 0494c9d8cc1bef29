"""The fused SSM core: it keeps only the in_proj output for backward and recomputes the rest, with
outputs and gradients equal to the unfused path, and the saved memory the issue asks for."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import MAMBA_TARGETS, output_cache, randomise_adapter, tiny_mamba

import lily_ssm
from lily_ssm.analysis.memory import saved_bytes
from lily_ssm.modules.recompute import unfused
from lily_ssm.ops import kernels
from lily_ssm.ops.standins import ScanExtensionStandin, gpu_structure, mamba_inner_standin
from lily_ssm.utils.compat import LayerStates

IDS = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
LABELS = IDS.masked_fill((torch.arange(9) < 6) | (MASK == 0), -100)  # a prompt for sequence routing
TARGET_SETS = [["in_proj"], ["x_proj"], ["dt_proj"], ["out_proj"], ["in_proj.x", "x_proj.dt"], ["x_proj.B"],
               list(MAMBA_TARGETS)]


def _pair(kind, targets, routing, dropout=0.0):
    config = lily_ssm.LilyConfig(targets, r=3, num_A=2, num_B=3, routing=routing, dropout=dropout,
                                 allow_lookahead=routing == "batch")
    model = lily_ssm.apply_adapter(tiny_mamba(kind), config)
    randomise_adapter(model, std=0.3)
    return model, copy.deepcopy(model)


def _step(model, **kwargs):
    model.train()
    torch.manual_seed(5)  # the same dropout masks on both paths
    out = model(IDS, attention_mask=MASK, labels=LABELS, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(fused, plain, **kwargs):
    out_f, grads_f = _step(fused, **kwargs)
    with unfused():
        out_p, grads_p = _step(plain, **kwargs)
    torch.testing.assert_close(out_f.logits, out_p.logits, atol=1e-6, rtol=1e-6)
    assert set(grads_f) == set(grads_p) and grads_f, "the same parameters get gradients"
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-6, rtol=1e-5, msg=name)
    assert all(g.abs().sum() > 0 for n, g in grads_f.items() if n.endswith(".A")), "every A is trained"
    return out_f, out_p


@pytest.mark.parametrize("targets", TARGET_SETS, ids="+".join)
@pytest.mark.parametrize("routing", ["causal", "sequence", "token", "batch"])
def test_fused_equals_unfused_for_every_target_and_routing(mamba_kind, targets, routing):
    _assert_same(*_pair(mamba_kind, targets, routing))


def test_the_fused_core_on_the_scan_extension_equals_unfused(mamba_kind):
    """The fused core's kernel path (``selective_scan_cuda``'s fwd / bwd layouts, a reference behind them): the
    loss and every gradient of the unfused model on lily-ssm's own scan."""
    fused, plain = _pair(mamba_kind, list(MAMBA_TARGETS), "causal")
    calls = {"fwd": 0, "bwd": 0}

    class Extension(ScanExtensionStandin):
        @staticmethod
        def fwd(*args):
            calls["fwd"] += 1
            return ScanExtensionStandin.fwd(*args)

        @staticmethod
        def bwd(*args):
            calls["bwd"] += 1
            return ScanExtensionStandin.bwd(*args)

    with kernels.override(selective_scan_cuda=Extension):
        _assert_same(fused, plain)
    assert calls == {"fwd": 3, "bwd": 3}  # once per layer each way: the scan is not run again in backward


def test_dropout_inside_the_core_repeats_its_masks():
    _assert_same(*_pair("falcon", ["x_proj", "dt_proj"], "causal", dropout=0.3))


def test_fused_prefill_with_a_cache_equals_unfused():
    fused, plain = _pair("falcon", list(MAMBA_TARGETS), "causal")
    out_f, out_p = _assert_same(fused, plain, use_cache=True)
    for layer in range(3):
        fused_states, plain_states = LayerStates(output_cache(out_f), layer), LayerStates(output_cache(out_p), layer)
        torch.testing.assert_close(fused_states.recurrent, plain_states.recurrent, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(fused_states.conv, plain_states.conv)


def test_fused_equals_unfused_on_the_kernel_path():
    """With the CUDA kernels substituted on CPU (stand-ins behind the kernel signatures)."""
    with gpu_structure(("cpu",)):
        _assert_same(*_pair("falcon", list(MAMBA_TARGETS), "causal"))


def test_vim_fused_equals_unfused():
    from lily_ssm.models.vim import VimConfig, VisionMamba

    torch.manual_seed(0)
    vim = VisionMamba(VimConfig(img_size=16, patch_size=8, embed_dim=16, depth=2, num_classes=3))
    lily_ssm.apply_adapter(vim, lily_ssm.LilyConfig(["in_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj"], r=2,
                                                    num_A=2, num_B=2, routing="token"))
    randomise_adapter(vim, std=0.3)
    plain, pixels = copy.deepcopy(vim), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    vim(pixels).square().sum().backward()
    with unfused():
        plain(pixels).square().sum().backward()
    for (name, p), (_, q) in zip(vim.lily_ssm_adapter.named_parameters(), plain.lily_ssm_adapter.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def _seven_b_mixer():
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    with torch.device("meta"):
        model = FalconMambaForCausalLM(FalconMambaConfig(
            vocab_size=65024, hidden_size=4096, intermediate_size=8192, num_hidden_layers=1, state_size=16,
            time_step_rank=256, conv_kernel=4)).to(torch.bfloat16)
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj", "dt_proj"], r=40, num_A=1, num_B=4,
                                                      routing="causal", overrides={"dt_proj": {"r": 8}}))
    return model.train(), model.backbone.layers[0].mixer


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu-structure", "cpu-path"])
def test_a_7b_mixer_saves_no_more_than_mamba_inner_fn(gpu):
    """Falcon-Mamba-7B's mixer shape in bf16, Lily on in_proj (r 40) and dt_proj (r 8), on the meta device: the
    fused mixer keeps no more per token than mamba_inner_fn (the fused peer, the same adapter on in_proj) on the
    GPU path, and far less than unfused either way."""
    model, mixer = _seven_b_mixer()
    hidden = torch.empty(4, 256, 4096, dtype=torch.bfloat16, device="meta", requires_grad=True)
    per_token_kib = 4 * 256 * 1024
    peer = saved_bytes(lambda: mamba_inner_standin(mixer.in_proj(hidden).transpose(1, 2), mixer),
                       exclude=list(model.parameters())) / per_token_kib
    with gpu_structure(("meta",)) if gpu else contextlib.nullcontext():
        fused = saved_bytes(lambda: mixer(hidden), exclude=list(model.parameters())) / per_token_kib
        with unfused():
            plain = saved_bytes(lambda: mixer(hidden), exclude=list(model.parameters())) / per_token_kib
    assert fused <= (peer if gpu else 1.6 * peer) and fused < 0.7 * plain, (fused, peer, plain)
    assert fused >= 48  # it does keep xz (2 x 8192 bf16 values per token) and the scan's output (8192)

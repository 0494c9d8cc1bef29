"""CUDA-kernel checks (run with ``pytest -m cuda`` on a GPU with mamba-ssm and causal-conv1d).

They compare the kernels against lily-ssm's PyTorch path with adapters active: values and gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MAMBA_TARGETS, randomise_adapter, tiny_mamba

import lily_ssm
from lily_ssm.ops import conv as conv_ops
from lily_ssm.ops import kernels, selective_scan_chunked

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _need_kernels():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    missing = [name for name in kernels._KERNEL_FUNCTIONS if kernels.get(name) is None]
    if missing:
        pytest.skip(f"CUDA kernels not importable: {', '.join(missing)}")


def _reference_only():
    """Inside this block no kernel is usable, so lily-ssm runs its PyTorch path on CUDA tensors too."""
    return kernels.override(devices=("cuda",))


def test_scan_kernel_matches_chunked_scan_values_and_gradients():
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, n, length = 2, 64, 16, 300
    x = {
        "u": torch.randn(b, d, length, device="cuda", generator=g),
        "delta": torch.randn(b, d, length, device="cuda", generator=g) * 0.5,
        "A": -torch.rand(d, n, device="cuda", generator=g) * 4,
        "B": torch.randn(b, n, length, device="cuda", generator=g),
        "C": torch.randn(b, n, length, device="cuda", generator=g),
        "D": torch.randn(d, device="cuda", generator=g),
        "z": torch.randn(b, d, length, device="cuda", generator=g),
        "delta_bias": torch.randn(d, device="cuda", generator=g) * 0.5,
    }
    for v in x.values():
        v.requires_grad_()
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out_k, last_k = kernels.get("selective_scan_fn")(*args, True, True)
    out_r, last_r = selective_scan_chunked(*args, True, True)
    torch.testing.assert_close(out_k, out_r, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(last_k.float(), last_r, atol=1e-4, rtol=1e-3)
    grads_k = torch.autograd.grad(out_k.sum(), args)
    grads_r = torch.autograd.grad(out_r.sum(), args)
    for name, gk, gr in zip(x, grads_k, grads_r):
        torch.testing.assert_close(gk, gr, atol=1e-3, rtol=1e-3, msg=f"gradient of {name}")


def test_conv_kernels_match_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 64, 40, device="cuda", generator=g)
    weight, bias = torch.randn(64, 4, device="cuda", generator=g), torch.randn(64, device="cuda", generator=g)
    torch.testing.assert_close(conv_ops.causal_conv1d(x, weight, bias, "silu"),
                               conv_ops.causal_conv1d_ref(x, weight, bias, "silu"), atol=1e-5, rtol=1e-5)
    state_k, state_r = torch.zeros(2, 64, 4, device="cuda"), torch.zeros(2, 64, 4, device="cuda")
    for t in range(6):
        step = x[..., t]
        torch.testing.assert_close(conv_ops.causal_conv1d_update(step, state_k, weight, bias, "silu"),
                                   conv_ops.causal_conv1d_update_ref(step, state_r, weight, bias, "silu"),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["falcon", "mamba"])
def test_adapted_model_on_kernels_matches_pytorch_path(kind):
    model = lily_ssm.apply_adapter(tiny_mamba(kind), lily_ssm.LilyConfig(list(MAMBA_TARGETS), r=4, num_A=2, num_B=3))
    randomise_adapter(model)
    model = model.cuda().train()
    reference = copy.deepcopy(model)
    ids = torch.randint(2, 64, (2, 24), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    loss_k = model(ids, attention_mask=mask, labels=ids).loss
    loss_k.backward()
    with _reference_only():
        loss_r = reference(ids, attention_mask=mask, labels=ids).loss
        loss_r.backward()
    torch.testing.assert_close(loss_k, loss_r, atol=1e-4, rtol=1e-4)
    for (name, pk), (_, pr) in zip(model.lily_ssm_adapter.named_parameters(),
                                   reference.lily_ssm_adapter.named_parameters()):
        assert pk.grad is not None and pk.grad.abs().sum() > 0, name
        torch.testing.assert_close(pk.grad, pr.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("routing", ["sequence", "causal", "token"])
def test_cached_generation_on_kernels_matches_pytorch_path(routing):
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"),
                                   lily_ssm.LilyConfig(list(MAMBA_TARGETS), r=4, num_A=2, num_B=3, routing=routing))
    randomise_adapter(model, std=0.5)
    model = model.cuda().eval()
    ids = torch.randint(2, 64, (2, 9), device="cuda")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        on_kernels = model.generate(ids, use_cache=True, **kwargs)
        with _reference_only():
            on_reference = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(on_kernels, on_reference)

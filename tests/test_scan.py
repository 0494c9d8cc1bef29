"""The chunked PyTorch selective scan against the sequential oracle and against the references mamba-ssm 2.3.2
publishes (selective_scan_ref, selective_state_update_ref: its kernels' own test oracles); decoding ops against full
passes."""

from __future__ import annotations

import pytest
import torch
from upstream_sources import MAMBA_SSM, published_or_skip

from lily_ssm.ops import (
    causal_conv1d,
    causal_conv1d_update,
    selective_scan,
    selective_scan_chunked,
    selective_state_update,
)
from lily_ssm.ops.scan import selective_scan_ref, selective_state_update_ref


def scan_inputs(length, b=2, d=6, n=4, seed=0, dtype=torch.float32, a_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "u": torch.randn(b, d, length, generator=g),
        "delta": torch.randn(b, d, length, generator=g) * 0.5,
        "A": -torch.rand(d, n, generator=g) * a_scale - 0.1,
        "B": torch.randn(b, n, length, generator=g),
        "C": torch.randn(b, n, length, generator=g),
        "D": torch.randn(d, generator=g),
        "z": torch.randn(b, d, length, generator=g),
        "delta_bias": torch.randn(d, generator=g) * 0.5,
    }
    return {k: v.to(dtype if k in ("u", "delta", "B", "C", "z") else torch.float32).requires_grad_()
            for k, v in tensors.items()}


def run(fn, x, chunk=None, **kw):
    extra = {"chunk": chunk} if chunk else {}
    return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], **kw, **extra)


@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 40, 64, 100])
@pytest.mark.parametrize("softplus", [True, False])
def test_chunked_matches_oracle_values_and_gradients(length, softplus):
    x = scan_inputs(length)
    if not softplus:  # without softplus, Δ must already be a positive step size
        x["delta"] = x["delta"].detach().abs().requires_grad_()
        x["delta_bias"] = x["delta_bias"].detach().abs().requires_grad_()
    out_ref, last_ref = run(selective_scan_ref, x, delta_softplus=softplus, return_last_state=True)
    out, last = run(selective_scan_chunked, x, chunk=16, delta_softplus=softplus, return_last_state=True)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, last_ref, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(1)
    g_out, g_last = torch.randn(out.shape, generator=g), torch.randn(last.shape, generator=g)
    grads_ref = torch.autograd.grad((out_ref * g_out).sum() + (last_ref * g_last).sum(), list(x.values()))
    grads = torch.autograd.grad((out * g_out).sum() + (last * g_last).sum(), list(x.values()))
    for name, got, want in zip(x, grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")


@pytest.fixture(scope="module")
def published():
    return {**published_or_skip(MAMBA_SSM, "mamba_ssm/ops/selective_scan_interface.py", ("selective_scan_ref",)),
            **published_or_skip(MAMBA_SSM, "mamba_ssm/ops/triton/selective_state_update.py",
                                ("selective_state_update_ref",))}


@pytest.mark.parametrize("length", [1, 17, 64])
@pytest.mark.parametrize("options", ["all", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_scan_matches_mamba_ssms_published_reference(published, length, options, dtype):
    x = scan_inputs(length, dtype=dtype)
    if options == "none":
        x.update(D=None, z=None, delta_bias=None)
        x["delta"] = x["delta"].detach().abs().requires_grad_()  # without softplus Δ must already be positive
    softplus = options == "all"
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    grad_tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else tol
    leaves = {name: v for name, v in x.items() if v is not None}
    weights = torch.randn(x["u"].shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    want, want_last = run(published["selective_scan_ref"], x, delta_softplus=softplus, return_last_state=True)
    grads_want = torch.autograd.grad((want * weights).float().sum(), list(leaves.values()))
    for ours in (selective_scan, selective_scan_ref):  # the dispatch (chunked on CPU) and our sequential oracle
        got, last = run(ours, x, delta_softplus=softplus, return_last_state=True)
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(last, want_last, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad((got * weights).float().sum(), list(leaves.values()))
        for name, got_g, want_g in zip(leaves, grads, grads_want):
            torch.testing.assert_close(got_g.float(), want_g.float(), msg=f"gradient of {name}", **grad_tol)


@pytest.mark.parametrize("options", ["all", "none"])
def test_a_decoding_step_matches_mamba_ssms_published_reference(published, options):
    g = torch.Generator().manual_seed(4)
    b, d, n = 3, 6, 4
    state = torch.randn(b, d, n, generator=g)
    x, dt, z = (torch.randn(b, d, generator=g) for _ in range(3))
    A, B, C = -torch.rand(d, n, generator=g) - 0.1, torch.randn(b, n, generator=g), torch.randn(b, n, generator=g)
    D, dt_bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    extra = {"D": D, "z": z, "dt_bias": dt_bias, "dt_softplus": True} if options == "all" else {}
    if options == "none":
        dt = dt.abs()
    theirs_state = state.clone()
    want = published["selective_state_update_ref"](theirs_state, x, dt, A, B, C, **extra)
    got = selective_state_update(state, x, dt, A, B, C, **extra)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state, theirs_state, atol=1e-6, rtol=1e-6)


def test_optional_inputs_can_be_absent():
    x = scan_inputs(23)
    want = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"])
    got = selective_scan_chunked(x["u"], x["delta"], x["A"], x["B"], x["C"], chunk=8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(got.sum(), [x["u"], x["delta"], x["A"], x["B"], x["C"]])
    grads_ref = torch.autograd.grad(want.sum(), [x["u"], x["delta"], x["A"], x["B"], x["C"]])
    for got_g, want_g in zip(grads, grads_ref):
        torch.testing.assert_close(got_g, want_g, atol=1e-4, rtol=1e-4)


def test_long_sequence_with_fast_decay_stays_finite_and_exact():
    x = scan_inputs(1500, b=1, d=4, n=8, a_scale=60.0)
    want = run(selective_scan_ref, x, delta_softplus=True)
    got = run(selective_scan_chunked, x, delta_softplus=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_bf16_inputs_accumulate_in_fp32():
    x = scan_inputs(300, dtype=torch.bfloat16)
    out, last = run(selective_scan_chunked, x, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    # oracle in fp32 on the same (bf16-valued) inputs: only the output rounding differs
    x32 = {k: v.detach().float() for k, v in x.items()}
    want = run(selective_scan_ref, x32, delta_softplus=True)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=1e-2)
    out.float().sum().backward()
    assert x["u"].grad.dtype == torch.bfloat16 and torch.isfinite(x["u"].grad.float()).all()


def test_final_state_matches_step_by_step_decoding():
    x = {k: v.detach() for k, v in scan_inputs(37).items()}
    out, last = run(selective_scan_chunked, x, chunk=8, delta_softplus=True, return_last_state=True)
    state = torch.zeros_like(last)
    steps = []
    for t in range(37):
        steps.append(selective_state_update_ref(
            state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t], x["D"],
            z=x["z"][..., t], dt_bias=x["delta_bias"], dt_softplus=True))
    torch.testing.assert_close(torch.stack(steps, -1), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, last, atol=1e-5, rtol=1e-5)


def test_continuing_from_a_state_equals_one_pass():
    x = {k: v.detach() for k, v in scan_inputs(40).items()}
    full = run(selective_scan, x, delta_softplus=True)

    def part(sl, state=None):
        return selective_scan(x["u"][..., sl], x["delta"][..., sl], x["A"], x["B"][..., sl], x["C"][..., sl],
                              x["D"], x["z"][..., sl], x["delta_bias"], True, True, initial_state=state)

    first, state = part(slice(0, 25))
    second, _ = part(slice(25, 40), state)
    torch.testing.assert_close(torch.cat([first, second], -1), full, atol=1e-5, rtol=1e-5)


def test_conv_update_steps_equal_full_convolution():
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 12, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    full = causal_conv1d(x, weight, bias, activation="silu")
    state = torch.zeros(2, 5, 4)
    steps = [causal_conv1d_update(x[..., t : t + 1], state, weight, bias, activation="silu") for t in range(12)]
    torch.testing.assert_close(torch.cat(steps, -1), full, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="activation='gelu'"):
        causal_conv1d(x, weight, bias, activation="gelu")

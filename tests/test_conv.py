"""lily_ssm.ops.causal_conv1d_update as causal-conv1d's kernel defines it: one token or several, any state length of
at least width - 1, the state left holding the last inputs; checked against the definition, position by position,
and against the references causal-conv1d 1.7.0 publishes (its kernels' own test oracle)."""

from __future__ import annotations

import pytest
import torch
from upstream_sources import CAUSAL_CONV1D, published_or_skip

from lily_ssm.ops import causal_conv1d, causal_conv1d_update
from lily_ssm.ops.conv import causal_conv1d_update_ref


def by_definition(x, state, weight, bias):
    """Output t is the width-long window of (state, x) that ends at x's token t, times the weights, plus the bias;
    the new state is the last state_len inputs."""
    tokens = torch.cat([state, x if x.dim() == 3 else x[..., None]], dim=-1)
    width, length = weight.shape[-1], (x.shape[-1] if x.dim() == 3 else 1)
    start = tokens.shape[-1] - length
    out = torch.stack([(tokens[..., start + t - width + 1:start + t + 1] * weight).sum(-1) + bias
                       for t in range(length)], dim=-1)
    out = torch.nn.functional.silu(out)
    return (out if x.dim() == 3 else out[..., 0]), tokens[..., -state.shape[-1]:]


@pytest.mark.parametrize("shape", [(2, 8), (2, 8, 1), (2, 8, 3)], ids=["one token", "(b, d, 1)", "three tokens"])
@pytest.mark.parametrize("state_len", [3, 4, 7])
def test_update_follows_the_kernel_definition(shape, state_len):
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(*shape, generator=g), torch.randn(8, 4, generator=g), torch.randn(8, generator=g)
    state = torch.randn(2, 8, state_len, generator=g)
    expected, expected_state = by_definition(x, state.clone(), weight, bias)
    got = causal_conv1d_update(x, state, weight, bias, activation="silu")
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(state, expected_state)


def test_a_state_shorter_than_the_window_is_refused():
    with pytest.raises(ValueError, match="conv_state holds 2 positions; a width-4 convolution needs at least 3"):
        causal_conv1d_update_ref(torch.randn(2, 8), torch.randn(2, 8, 2), torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"expected x \(batch, dim\) or \(batch, dim, seqlen\)"):
        causal_conv1d_update_ref(torch.randn(2, 8), torch.randn(3, 8, 4), torch.randn(8, 4))


@pytest.fixture(scope="module")
def published():
    return published_or_skip(CAUSAL_CONV1D, "causal_conv1d/causal_conv1d_interface.py",
                             ("causal_conv1d_ref", "causal_conv1d_update_ref"))


@pytest.mark.parametrize("shape", [(2, 8), (2, 8, 1), (2, 8, 3)], ids=["one token", "(b, d, 1)", "three tokens"])
@pytest.mark.parametrize("state_len", [3, 4, 7])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_matches_causal_conv1ds_published_reference(published, shape, state_len, activation, dtype):
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(*shape, generator=g).to(dtype), torch.randn(8, 4, generator=g)
    bias = torch.randn(8, generator=g)
    state = torch.randn(2, 8, state_len, generator=g).to(dtype)
    theirs_state = state.clone()
    expected = published["causal_conv1d_update_ref"](x, theirs_state, weight, bias, activation=activation)
    got = causal_conv1d_update(x, state, weight, bias, activation=activation)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(state, theirs_state, rtol=0, atol=0)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_convolution_matches_causal_conv1ds_published_reference(published, width, activation, with_bias):
    g = torch.Generator().manual_seed(2)
    x, weight = torch.randn(2, 8, 11, generator=g), torch.randn(8, width, generator=g)
    bias = torch.randn(8, generator=g) if with_bias else None
    expected = published["causal_conv1d_ref"](x, weight, bias, activation=activation)
    torch.testing.assert_close(causal_conv1d(x, weight, bias, activation=activation), expected, rtol=0, atol=0)

"""The chunked Mamba-2 (SSD) scan against the sequential oracle, an fp64 recurrence and transformers' own
PyTorch path: values, gradients, final states, padding, groups, limits and gating."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lily_ssm.ops import ssd


def _inputs(batch=2, length=37, heads=4, head_dim=3, state=5, groups=2, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, length, heads, head_dim, generator=g),
        dt=torch.randn(batch, length, heads, generator=g) * scale,
        A=-torch.rand(heads, generator=g) * 2 - 0.2,
        B=torch.randn(batch, length, groups, state, generator=g),
        C=torch.randn(batch, length, groups, state, generator=g),
        D=torch.randn(heads, generator=g),
        z=torch.randn(batch, length, heads, head_dim, generator=g),
        dt_bias=torch.randn(heads, generator=g) * 0.3,
    )


def _fp64_recurrence(x, dt, A, B, C, D, dt_bias):
    """The recurrence in fp64, written out without any of ssd.py's helpers."""
    x, dt, A, B, C, D, dt_bias = (t.double() for t in (x, dt, A, B, C, D, dt_bias))
    b, length, h, p = x.shape
    per = h // B.shape[2]
    delta = F.softplus(dt + dt_bias)
    state = torch.zeros(b, h, p, B.shape[-1], dtype=torch.double)
    out = []
    for t in range(length):
        for head in range(h):
            grp = head // per
            state[:, head] = (torch.exp(delta[:, t, head] * A[head])[:, None, None] * state[:, head]
                              + (delta[:, t, head, None] * x[:, t, head])[:, :, None] * B[:, t, grp, None, :])
        out.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t].repeat_interleave(per, dim=1)))
    return torch.stack(out, 1) + x * D[:, None]


@pytest.mark.parametrize("length,chunk", [(37, 8), (16, 16), (5, 64), (1, 4)])
def test_chunked_scan_matches_the_sequential_oracle_with_states_and_gradients(length, chunk):
    inp = _inputs(length=length)
    init = torch.randn(2, 4, 3, 5)
    leaves = {k: inp[k].clone().requires_grad_() for k in ("x", "dt", "B", "C", "z")}
    results = []
    for scan in (ssd.ssd_scan_ref, ssd.ssd_chunk_scan):
        args = {**inp, **{k: v for k, v in leaves.items()}}
        for v in leaves.values():
            v.grad = None
        y, final = scan(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk, D=args["D"], z=args["z"],
                        dt_bias=args["dt_bias"], initial_states=init, dt_softplus=True, return_final_states=True)
        (y.square().mean() + final.sum()).backward()
        results.append((y.detach(), final.detach(), {k: v.grad.clone() for k, v in leaves.items()}))
    (y_ref, s_ref, g_ref), (y, s, grads) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    for k in leaves:
        torch.testing.assert_close(grads[k], g_ref[k], rtol=1e-4, atol=1e-5, msg=f"gradient of {k}")


def test_dt_limit_and_no_softplus_follow_the_oracle():
    inp = _inputs()
    dt = inp["dt"].abs()
    common = dict(D=inp["D"], dt_bias=inp["dt_bias"].abs(), dt_limit=(0.1, 0.4))
    ref = ssd.ssd_scan_ref(inp["x"], dt, inp["A"], inp["B"], inp["C"], 8, **common)
    got = ssd.ssd_chunk_scan(inp["x"], dt, inp["A"], inp["B"], inp["C"], 8, **common)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_long_sequences_stay_as_accurate_as_transformers_path():
    """Decays are differences of cumulative sums that grow along a chunk: in fp32 their rounding alone cost
    ~8e-4 here (five times transformers' error), so they are summed in fp64."""
    modeling = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    inp = _inputs(batch=1, length=300, heads=4, head_dim=8, state=16, groups=1, seed=1, scale=1.0)
    inp["A"] = -torch.rand(4, generator=torch.Generator().manual_seed(2)) * 4 - 0.5
    exact = _fp64_recurrence(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["dt_bias"])
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 256)
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True)
    ours = (ssd.ssd_chunk_scan(*args, **kw).double() - exact).abs().max()
    theirs = (modeling.mamba2_chunk_scan(*args, **kw).double() - exact).abs().max()
    assert ours <= max(theirs, 1e-6) * 1.5, (float(ours), float(theirs))


def test_the_state_update_continues_the_scan():
    """Scanning t tokens and then decoding one step with the state update == scanning t + 1 tokens."""
    inp = _inputs(length=9)
    x, dt, A, B, C, D, z, bias = (inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias"))
    full = ssd.ssd_chunk_scan(x, dt, A, B, C, 4, D=D, z=z, dt_bias=bias, dt_softplus=True)
    _, state = ssd.ssd_chunk_scan(x[:, :8], dt[:, :8], A, B[:, :8], C[:, :8], 4, dt_bias=bias, dt_softplus=True,
                                  return_final_states=True)
    p, n = x.shape[-1], B.shape[-1]
    step = ssd.ssd_state_update(state, x[:, 8], dt[:, 8, :, None].expand(-1, -1, p),
                                A[:, None, None].expand(-1, p, n), B[:, 8], C[:, 8],
                                D=D[:, None].expand(-1, p), z=z[:, 8], dt_bias=bias[:, None].expand(-1, p),
                                dt_softplus=True)
    torch.testing.assert_close(step, full[:, 8], rtol=1e-5, atol=1e-5)

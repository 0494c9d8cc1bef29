"""The Lily layer against the 'intuitive' form of paper App. A.2: every B expert run, outputs mixed."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_adapter, tiny_mamba

import lily_ssm
from lily_ssm.tuners.targets import a_group


def naive_lily(x, mask, A, B, R, scaling, routing):
    """Run each expert on x' separately and mix the outputs with the routing mode's weights."""
    h = x @ A  # (N, T, r)
    probs = torch.softmax(h @ R.T, dim=-1)  # (N, T, E)
    outputs = torch.stack([h @ B[e] for e in range(B.shape[0])], dim=-1)  # (N, T, out, E)
    n, t, e = probs.shape
    valid = torch.ones(n, t) if mask is None else mask.float()
    if routing == "token":
        weights = probs
    elif routing == "batch":
        weights = probs.reshape(-1, e).mean(0).expand(n, t, e)
    elif routing == "sequence":
        per_sample = []
        for i in range(n):
            rows = [probs[i, j] for j in range(t) if valid[i, j] > 0]
            per_sample.append(torch.stack(rows).mean(0))
        weights = torch.stack(per_sample)[:, None, :].expand(n, t, e)
    elif routing == "causal":
        weights = torch.zeros(n, t, e)
        for i in range(n):
            for j in range(t):
                rows = [probs[i, k] for k in range(j + 1) if valid[i, k] > 0]
                weights[i, j] = torch.stack(rows).mean(0) if rows else 0.0
    return scaling * (outputs * weights[:, :, None, :]).sum(-1)


@pytest.mark.parametrize("routing", ["sequence", "causal", "token", "batch"])
@pytest.mark.parametrize("placement", ["layer", "group", "global"])
def test_layer_matches_naive_expert_mixture(routing, placement):
    model = tiny_mamba("falcon", layers=5)
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj"], r=3, num_A=2, num_B=4, scaling=0.7,
                                                      routing=routing, router=placement))
    randomise_adapter(model)
    state = model.lily_ssm_adapter
    pool = state.pools["in_proj"]
    x = torch.randn(3, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    for slot in state.groups["in_proj"].modules:
        state.context.mask = mask
        state.context.incoming, state.context.outgoing = {}, {}
        got = pool.delta(x, slot)
        g = a_group(slot.position, 5, 2)
        r = {"layer": slot.position, "group": g, "global": 0}[placement]
        expected = naive_lily(x, mask, pool.A[g], pool.B, pool.router[r], 0.7, routing)
        # padded positions carry no meaning in sequence/causal modes; compare valid tokens
        keep = mask.bool() if routing in ("sequence", "causal") else torch.ones_like(mask, dtype=torch.bool)
        torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)


def test_single_b_expert_has_no_router_and_is_plain_low_rank():
    model = tiny_mamba("falcon", layers=2)
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["dt_proj"], r=2, num_A=2, num_B=1))
    pool = model.lily_ssm_adapter.pools["dt_proj"]
    assert pool.router is None and set(pool.parameter_kinds()) == {"A", "B"}
    randomise_adapter(model)
    slot = model.lily_ssm_adapter.groups["dt_proj"].modules[1]
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(pool.delta(x, slot), x @ pool.A[1] @ pool.B[0])


@pytest.mark.parametrize("layers,num_a,expected", [(5, 2, [0, 0, 0, 1, 1]), (5, 3, [0, 0, 1, 1, 2]),
                                                   (7, 7, list(range(7))), (4, 1, [0, 0, 0, 0])])
def test_a_groups_are_contiguous_balanced_blocks(layers, num_a, expected):
    assert [a_group(pos, layers, num_a) for pos in range(layers)] == expected


def test_a_group_mapping_and_b_sharing_in_a_model():
    model = tiny_mamba("falcon", layers=5)
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj"], r=2, num_A=2, num_B=2))
    state = model.lily_ssm_adapter
    slots = state.groups["in_proj"].modules
    assert [s.layer_index for s in slots] == [0, 1, 2, 3, 4]
    assert [state.pools["in_proj"].a_index(s) for s in slots] == [0, 0, 0, 1, 1]
    # Every layer's delta reads the same B tensor: zero B => every delta is zero; bump one expert => all change.
    x = torch.randn(1, 3, 16)
    for slot in slots:
        assert torch.count_nonzero(state.pools["in_proj"].delta(x, slot)) == 0
    with torch.no_grad():
        state.pools["in_proj"].B[1].normal_()
    for slot in slots:
        assert torch.count_nonzero(state.pools["in_proj"].delta(x, slot)) > 0


def test_dropout_applies_to_adapter_input_only_in_training():
    model = tiny_mamba("falcon", layers=2)
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj"], r=2, num_A=1, num_B=2, dropout=0.5,
                                                      routing="token"))
    randomise_adapter(model)
    pool, slot = model.lily_ssm_adapter.pools["in_proj"], model.lily_ssm_adapter.groups["in_proj"].modules[0]
    x = torch.randn(2, 4, 16)
    pool.eval()
    assert torch.equal(pool.delta(x, slot), pool.delta(x, slot))
    pool.train()
    torch.manual_seed(0)
    assert not torch.allclose(pool.delta(x, slot), pool.delta(x, slot))


def test_per_target_overrides():
    model = tiny_mamba("falcon", layers=4)
    config = lily_ssm.LilyConfig(["in_proj", "dt_proj"], r=4, num_A=2, num_B=3,
                                 overrides={"dt_proj": {"r": 2, "num_A": 4, "num_B": 1, "scaling": 0.5}})
    lily_ssm.apply_adapter(model, config)
    pools = model.lily_ssm_adapter.pools
    assert tuple(pools["in_proj"].A.shape) == (2, 16, 4) and tuple(pools["in_proj"].B.shape) == (3, 4, 64)
    assert tuple(pools["dt_proj"].A.shape) == (4, 4, 2) and tuple(pools["dt_proj"].B.shape) == (1, 2, 32)
    assert pools["dt_proj"].config.scaling == 0.5 and pools["in_proj"].config.scaling == 1.0


def test_bad_overrides_are_named():
    with pytest.raises(ValueError, match="adapted target types are: dt_proj, in_proj"):
        lily_ssm.apply_adapter(tiny_mamba(), lily_ssm.LilyConfig(["in_proj", "dt_proj"], r=2, num_A=1, num_B=2,
                                                                 overrides={"out_proj": {"r": 1}}))
    with pytest.raises(ValueError, match="only r, num_A, num_B, scaling"):
        lily_ssm.apply_adapter(tiny_mamba(), lily_ssm.LilyConfig(["in_proj"], r=2, num_A=1, num_B=2,
                                                                 overrides={"in_proj": {"routing": "token"}}))


@pytest.mark.parametrize("position", ["input", "after_A"])
def test_dropout_position(position):
    """``input`` drops x before A (as PEFT's LoRA does); ``after_A`` drops the rank-r activations, which
    the router then reads too (the published Vim code)."""
    model = tiny_mamba("falcon", layers=2)
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj"], r=3, num_A=1, num_B=4, routing="token",
                                                      dropout=0.5, dropout_position=position))
    randomise_adapter(model)
    pool = model.lily_ssm_adapter.pools["in_proj"]
    slot = model.lily_ssm_adapter.groups["in_proj"].modules[0]
    x = torch.randn(2, 5, 16)
    pool.train()
    torch.manual_seed(11)
    got = pool.delta(x, slot)
    torch.manual_seed(11)  # the same dropout mask, drawn for the tensor that position drops
    if position == "input":
        h = torch.nn.functional.dropout(x, 0.5) @ pool.A[0]
    else:
        h = torch.nn.functional.dropout(x @ pool.A[0], 0.5)
    weights = torch.softmax(h @ pool.router[0].T, dim=-1)
    expected = sum(weights[..., e:e + 1] * (h @ pool.B[e]) for e in range(4))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    pool.eval()
    torch.testing.assert_close(pool.delta(x, slot), naive_lily(x, None, pool.A[0], pool.B, pool.router[0], 1.0,
                                                               "token"), atol=1e-5, rtol=1e-5)

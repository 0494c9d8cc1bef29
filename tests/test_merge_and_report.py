"""LoRA merging, Lily's refusal to merge, parameter reports against closed forms, and A / B sharing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_adapter, tiny_mamba
from torch import nn

import lily_ssm
from lily_ssm import LilyConfig, LoraConfig
from lily_ssm.tuners import AdaptedLinear

TARGETS = ["in_proj", "x_proj", "dt_proj", "out_proj"]

# tiny_mamba: hidden 16, intermediate 32, state 4, time_step_rank 4
H, I, S, R = 16, 32, 4, 4
SHAPES = {"in_proj": (H, 2 * I), "x_proj": (I, R + 2 * S), "dt_proj": (R, I), "out_proj": (I, H)}


def input_ids(batch: int = 2, length: int = 9, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, 64, (batch, length), generator=gen)


def logits(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kw).logits


def base_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Merging


@pytest.mark.parametrize("kind", ["falcon", "mamba"])
def test_lora_merge_matches_unmerged(kind):
    config = LoraConfig(targets=list(TARGETS), r=3, alpha=6.0, overrides={"dt_proj": {"r": 2, "alpha": 1.0}})
    model = lily_ssm.apply_adapter(tiny_mamba(kind, layers=3), config)
    randomise_adapter(model, std=0.2)
    ids = input_ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    unmerged = logits(model, ids)
    unmerged_masked = logits(model, ids, attention_mask=mask)
    assert not torch.allclose(unmerged, logits(tiny_mamba(kind, layers=3), ids), atol=1e-3)

    merged = lily_ssm.merge_adapter(model)
    assert merged is model
    assert not hasattr(merged, "lily_ssm_adapter")
    assert not any(isinstance(m, AdaptedLinear) for m in merged.modules())
    for name, module in merged.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            assert type(module) is nn.Linear, name
            assert not hasattr(module, "_lily_adapters")
    assert not any(k.startswith("lily_ssm_adapter") for k in merged.state_dict())
    assert "generate" not in merged.__dict__  # the routing wrapper was removed too

    torch.testing.assert_close(logits(merged, ids), unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(merged, ids, attention_mask=mask), unmerged_masked, atol=1e-5, rtol=0)

    # The merged weights stand alone: a fresh, never-patched model with them gives the same logits.
    fresh = tiny_mamba(kind, layers=3, seed=123)
    fresh.load_state_dict(merged.state_dict())
    torch.testing.assert_close(logits(fresh, ids), unmerged, atol=1e-4, rtol=1e-4)


def test_lora_merge_changes_exactly_the_target_weights():
    base = tiny_mamba("falcon", layers=2)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = lily_ssm.apply_adapter(base, LoraConfig(targets=["in_proj", "dt_proj"], r=2, alpha=4.0))
    randomise_adapter(model)
    pools = model.lily_ssm_adapter.pools
    expected = {}
    for key, group in model.lily_ssm_adapter.groups.items():
        for slot in group.modules:
            i = pools[key].index[slot.key]
            delta = (pools[key].A[i] @ pools[key].B[i]).T * 2.0  # alpha / r
            expected[slot.name + ".weight"] = before[slot.name + ".weight"] + delta
    lily_ssm.merge_adapter(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for key in before:
        if key in expected:
            torch.testing.assert_close(after[key], expected[key].detach())
        else:
            assert torch.equal(after[key], before[key]), key


def test_merge_lily_raises():
    model = lily_ssm.apply_adapter(tiny_mamba(), LilyConfig(targets=["in_proj"], r=2, num_A=1, num_B=2))
    with pytest.raises(ValueError) as info:
        lily_ssm.merge_adapter(model)
    message = str(info.value)
    assert "router" in message and "input" in message
    assert hasattr(model, "lily_ssm_adapter")  # nothing was removed
    assert isinstance(model.backbone.layers[0].mixer.in_proj, AdaptedLinear)


def test_merge_without_adapter_raises():
    with pytest.raises(ValueError, match="no adapter"):
        lily_ssm.merge_adapter(tiny_mamba())


# --------------------------------------------------------------------------------------------------
# Parameter reports


def lily_closed_form(targets, layers, r, num_a, num_b, router, overrides=None):
    out = {}
    for t in targets:
        values = {"r": r, "num_A": num_a, "num_B": num_b, **(overrides or {}).get(t, {})}
        c_in, c_out = SHAPES[t]
        kinds = {"A": values["num_A"] * c_in * values["r"], "B": values["num_B"] * values["r"] * c_out}
        if values["num_B"] > 1:
            n_routers = {"layer": layers, "group": values["num_A"], "global": 1}[router]
            kinds["router"] = n_routers * values["num_B"] * values["r"]
        out[t] = kinds
    return out


@pytest.mark.parametrize("router", ["layer", "group", "global"])
def test_lily_report_matches_closed_form(router):
    layers, overrides = 5, {"dt_proj": {"r": 2, "num_B": 1}, "x_proj": {"num_A": 5, "num_B": 4}}
    base = tiny_mamba(layers=layers)
    base_count = base_parameter_count(base)
    config = LilyConfig(targets=list(TARGETS), r=3, num_A=2, num_B=3, router=router, overrides=overrides)
    model = lily_ssm.apply_adapter(base, config)
    report = lily_ssm.parameter_report(model)

    expected = lily_closed_form(TARGETS, layers, 3, 2, 3, router, overrides)
    assert report.method == "lily"
    assert report.by_target == expected
    assert "router" not in report.by_target["dt_proj"]
    kinds = {k: sum(v.get(k, 0) for v in expected.values()) for k in ("A", "B", "router")}
    assert report.by_kind() == kinds
    total = sum(kinds.values())
    assert report.adapter_total == total
    assert report.trainable == total
    assert report.other_trainable == 0
    assert report.base_parameters == base_count
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)

    # Spot check one entry by hand: in_proj, r=3, num_A=2, num_B=3, C_in=16, C_out=64.
    n_routers = {"layer": 5, "group": 2, "global": 1}[router]
    assert report.by_target["in_proj"] == {"A": 2 * 16 * 3, "B": 3 * 3 * 64, "router": n_routers * 3 * 3}

    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "lily adapter parameters"
    header = lines[1].split()
    assert header == ["target", "A", "B", "router", "total"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if line.split()[0] in {*TARGETS, "all"}}
    assert set(rows) == {*TARGETS, "all"}
    assert rows["all"][-1] == f"{total:,}"
    assert rows["dt_proj"][2] == "0"  # no router column entry for a single B
    assert rows["in_proj"] == [f"{v:,}" for v in report.by_target["in_proj"].values()] + [
        f"{sum(report.by_target['in_proj'].values()):,}"]
    assert lines[-1].startswith(f"trainable {total:,} of base {base_count:,}")
    # Columns line up: every table row is the same width as the header.
    assert len({len(line) for line in lines[1:2 + len(rows)]}) == 1


def test_report_counts_other_trainable_parameters():
    model = lily_ssm.apply_adapter(tiny_mamba(), LilyConfig(targets=["in_proj"], r=2, num_A=1, num_B=1))
    model.backbone.norm_f.weight.requires_grad_(True)
    report = lily_ssm.parameter_report(model)
    assert report.by_target == {"in_proj": {"A": 16 * 2, "B": 2 * 64}}
    assert report.other_trainable == H
    assert report.trainable == report.adapter_total + H
    assert f"other trainable: {H:,}" in str(report)


def test_lora_report_matches_closed_form():
    layers = 4
    base = tiny_mamba(layers=layers)
    base_count = base_parameter_count(base)
    config = LoraConfig(targets=list(TARGETS), r=3, alpha=6.0, overrides={"out_proj": {"r": 5}})
    model = lily_ssm.apply_adapter(base, config)
    report = lily_ssm.parameter_report(model)
    expected = {}
    for t in TARGETS:
        r = 5 if t == "out_proj" else 3
        c_in, c_out = SHAPES[t]
        expected[t] = {"A": layers * c_in * r, "B": layers * r * c_out}
        assert sum(expected[t].values()) == layers * r * (c_in + c_out)
    assert report.method == "lora"
    assert report.by_target == expected
    total = sum(layers * (5 if t == "out_proj" else 3) * sum(SHAPES[t]) for t in TARGETS)
    assert report.adapter_total == report.trainable == total
    assert report.by_kind() == {"A": sum(v["A"] for v in expected.values()),
                                "B": sum(v["B"] for v in expected.values())}
    assert report.base_parameters == base_count
    text = str(report)
    assert text.splitlines()[0] == "lora adapter parameters"
    assert text.splitlines()[1].split() == ["target", "A", "B", "total"]
    assert f"{total:,}" in text


def test_report_without_adapter_raises():
    with pytest.raises(ValueError, match="no adapter"):
        lily_ssm.parameter_report(tiny_mamba())


# --------------------------------------------------------------------------------------------------
# Falcon-Mamba-7B settings of the paper, on the meta device


def falcon_mamba_7b_meta() -> nn.Module:
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    with torch.device("meta"):
        return FalconMambaForCausalLM(FalconMambaConfig(
            vocab_size=65024, hidden_size=4096, intermediate_size=8192, num_hidden_layers=64, state_size=16,
            time_step_rank=256, conv_kernel=4))


def test_falcon_mamba_7b_lily_count():
    model = lily_ssm.apply_adapter(falcon_mamba_7b_meta(), LilyConfig(targets=["in_proj"], r=40, num_A=4, num_B=4))
    report = lily_ssm.parameter_report(model)
    assert report.trainable == 3_287_040
    assert report.by_target == {"in_proj": {"A": 4 * 4096 * 40, "B": 4 * 40 * 16384, "router": 64 * 4 * 40}}
    assert all(p.is_meta for p in model.lily_ssm_adapter.parameters())
    assert sum(isinstance(m, AdaptedLinear) for m in model.modules()) == 64
    assert "3,287,040" in str(report)


def test_falcon_mamba_7b_lora_count():
    model = lily_ssm.apply_adapter(falcon_mamba_7b_meta(),
                                   LoraConfig(targets=["in_proj", "dt_proj"], r=2, alpha=4.0))
    report = lily_ssm.parameter_report(model)
    assert report.trainable == 3_702_784
    assert report.by_target == {"in_proj": {"A": 64 * 4096 * 2, "B": 64 * 2 * 16384},
                                "dt_proj": {"A": 64 * 256 * 2, "B": 64 * 2 * 8192}}
    assert all(p.is_meta for p in model.lily_ssm_adapter.parameters())


# --------------------------------------------------------------------------------------------------
# A sharing (local) and B sharing (global)


@pytest.mark.parametrize("num_a, expected", [(1, [0] * 5), (2, [0, 0, 0, 1, 1]), (3, [0, 0, 1, 1, 2]),
                                             (5, [0, 1, 2, 3, 4])])
def test_a_group_mapping(num_a, expected):
    model = lily_ssm.apply_adapter(tiny_mamba(layers=5), LilyConfig(targets=list(TARGETS), r=2, num_A=num_a,
                                                                    num_B=2))
    state = model.lily_ssm_adapter
    for target in TARGETS:
        pool, group = state.pools[target], state.groups[target]
        assert [slot.position for slot in group.modules] == list(range(5))
        assert [slot.layer_index for slot in group.modules] == list(range(5))
        assert [pool.a_index(slot) for slot in group.modules] == expected
        assert pool.A.shape[0] == num_a
    # 'group' routers follow the A groups, 'global' is one router.
    assert [state.pools["in_proj"].router_index(s) for s in state.groups["in_proj"].modules] == list(range(5))


@pytest.mark.parametrize("router, expected", [("group", [0, 0, 1, 1, 2]), ("global", [0] * 5)])
def test_router_index_mapping(router, expected):
    model = lily_ssm.apply_adapter(tiny_mamba(layers=5),
                                   LilyConfig(targets=["in_proj"], r=2, num_A=3, num_B=2, router=router))
    state = model.lily_ssm_adapter
    assert [state.pools["in_proj"].router_index(s) for s in state.groups["in_proj"].modules] == expected


def _adapter_outputs(model, target, x):
    """Each AdaptedLinear of ``target`` on the same input, minus its frozen projection."""
    outs = []
    with torch.no_grad():
        for slot in model.lily_ssm_adapter.groups[target].modules:
            module = model.get_submodule(slot.name)
            assert isinstance(module, AdaptedLinear)
            outs.append(module(x) - F.linear(x, module.weight, module.bias))
    return outs


@pytest.mark.parametrize("num_b", [1, 3])
def test_b_is_shared_by_every_layer(num_b):
    model = lily_ssm.apply_adapter(tiny_mamba(layers=5), LilyConfig(targets=["in_proj", "out_proj"], r=3,
                                                                    num_A=2, num_B=num_b))
    randomise_adapter(model)
    state = model.lily_ssm_adapter
    pool = state.pools["in_proj"]
    assert pool.B.shape == (num_b, 3, 2 * I)
    assert len(list(state.parameters())) == (3 if num_b > 1 else 2) * 2  # one tensor per kind per type

    x = torch.randn(2, 6, H, generator=torch.Generator().manual_seed(0))
    before = _adapter_outputs(model, "in_proj", x)
    x_out = torch.randn(2, 6, I, generator=torch.Generator().manual_seed(1))
    other_before = _adapter_outputs(model, "out_proj", x_out)
    hidden_before = _layer_outputs(model)
    with torch.no_grad():
        pool.B[0] += 0.5
    after = _adapter_outputs(model, "in_proj", x)
    assert len(before) == 5
    for layer, (b, a) in enumerate(zip(before, after)):
        assert not torch.allclose(a, b), f"layer {layer} does not use the shared B[0]"
    # Zeroing the one B tensor zeroes every layer's update.
    with torch.no_grad():
        pool.B.zero_()
    assert all(torch.count_nonzero(o) == 0 for o in _adapter_outputs(model, "in_proj", x))
    # Other target types have their own pool: out_proj is unchanged by editing in_proj's B.
    assert state.pools["out_proj"].B is not pool.B
    for b, a in zip(other_before, _adapter_outputs(model, "out_proj", x_out)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # And every layer's output in a full forward pass is affected.
    hidden_after = _layer_outputs(model)
    for layer, (b, a) in enumerate(zip(hidden_before, hidden_after)):
        assert not torch.allclose(a, b), layer


def _layer_outputs(model):
    outputs = []
    handles = [layer.mixer.in_proj.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
               for layer in model.backbone.layers]
    try:
        logits(model, input_ids(batch=1, length=5))
    finally:
        for h in handles:
            h.remove()
    return outputs


def test_b_shared_same_a_group_same_router_gives_same_update():
    """With a global router, layers in the same A group compute the identical update (A and B shared)."""
    model = lily_ssm.apply_adapter(tiny_mamba(layers=5), LilyConfig(targets=["in_proj"], r=3, num_A=2, num_B=3,
                                                                    router="global"))
    randomise_adapter(model)
    x = torch.randn(2, 6, H, generator=torch.Generator().manual_seed(0))
    outs = _adapter_outputs(model, "in_proj", x)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])
    torch.testing.assert_close(outs[3], outs[4])
    assert not torch.allclose(outs[2], outs[3])

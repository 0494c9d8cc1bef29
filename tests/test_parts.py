"""Adapters on parts of a projection's output: in_proj's x / z halves and x_proj's Δ / B / C slices."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_adapter, tiny_llama, tiny_mamba

import lily_ssm
from lily_ssm.tuners.targets import find_targets

# tiny_mamba: d_inner 32 -> in_proj 16 -> 64; x_proj 32 -> time_step_rank 4 + 2 * state 4 = 12
PART_SLICES = {"in_proj.x": (0, 32), "in_proj.z": (32, 64), "x_proj.dt": (0, 4), "x_proj.B": (4, 8),
               "x_proj.C": (8, 12)}


def lily(targets, **kw):
    return lily_ssm.LilyConfig(targets=targets, r=3, num_A=2, num_B=2, **kw)


def lora(targets, **kw):
    return lily_ssm.LoraConfig(targets=targets, r=3, alpha=6.0, **kw)


def projection_outputs(model, leaf):
    """Each ``leaf`` module's output, captured with forward hooks during one forward."""
    outputs, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith("." + leaf):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: outputs.__setitem__(n, o.detach())))
    return outputs, handles


@pytest.mark.parametrize("make", [lily, lora])
@pytest.mark.parametrize("target", list(PART_SLICES))
def test_part_adapter_touches_only_its_part(make, target, mamba_kind):
    """The projection's other outputs are unchanged; its own part does change."""
    leaf = target.split(".")[0]
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    base = tiny_mamba(mamba_kind)
    reference, handles = projection_outputs(base, leaf)
    base(ids)
    for h in handles:
        h.remove()

    model = lily_ssm.apply_adapter(tiny_mamba(mamba_kind), make([target]))
    randomise_adapter(model)
    outputs, _ = projection_outputs(model, leaf)
    model(ids)
    start, stop = PART_SLICES[target]
    assert len(outputs) == 3
    for name, out in outputs.items():
        # layer 0's x_proj input already differs when in_proj is adapted; here only the part's own
        # projection is adapted, so its input is the base model's for layer 0
        if ".0." not in name:
            continue
        ref = reference[name]
        inside = torch.zeros(out.shape[-1], dtype=torch.bool)
        inside[start:stop] = True
        torch.testing.assert_close(out[..., ~inside], ref[..., ~inside], rtol=0, atol=0)
        assert (out[..., inside] - ref[..., inside]).abs().max() > 1e-3


def test_part_groups_have_the_part_shape_and_keys():
    model = tiny_mamba("falcon")
    groups = {g.key: g for g in find_targets(model, ["in_proj.z", "x_proj.B", "dt_proj"])}
    assert set(groups) == {"in_proj.z", "x_proj.B", "dt_proj"}
    z = groups["in_proj.z"]
    assert (z.in_features, z.out_features) == (16, 32)
    assert z.modules[1].key == "backbone.layers.1.mixer.in_proj.z" and z.modules[1].out_slice == (32, 64)
    assert groups["x_proj.B"].out_features == 4 and groups["dt_proj"].modules[0].part is None


def test_both_halves_with_their_own_pools_and_gradients():
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily(["in_proj.x", "in_proj.z"],
                                                               overrides={"in_proj.z": {"r": 5}}))
    state = model.lily_ssm_adapter
    assert state.pools["in_proj.x"].A.shape == (2, 16, 3) and state.pools["in_proj.z"].A.shape == (2, 16, 5)
    assert "in_proj.x" in repr(model.backbone.layers[0].mixer.in_proj)
    ids = torch.randint(2, 64, (2, 6))
    model(ids, labels=ids).loss.backward()
    for pool in state.pools.values():
        assert pool.B.grad is not None and pool.B.grad.abs().sum() > 0


def test_part_target_errors_name_what_exists():
    model = tiny_mamba("falcon")
    with pytest.raises(ValueError, match=r"no output part 'y'; its parts are x, z"):
        find_targets(model, ["in_proj.y"])
    with pytest.raises(ValueError, match="targeted whole by 'in_proj' and in part by 'in_proj.x'"):
        find_targets(model, ["in_proj", "in_proj.x"])
    with pytest.raises(ValueError, match=r"only in_proj.x / in_proj.z .* have parts"):
        find_targets(tiny_llama(), ["q_proj.x"])
    with pytest.raises(ValueError, match="matches no module"):
        find_targets(model, ["nothing.x"])


def test_lora_parts_merge_into_the_right_rows():
    ids = torch.randint(2, 64, (2, 7))
    model = lily_ssm.apply_adapter(tiny_mamba("mamba"), lora(["in_proj.z", "x_proj.dt", "x_proj.C"]))
    randomise_adapter(model, std=0.1)
    with torch.no_grad():
        adapted = model(ids).logits
        merged = lily_ssm.merge_adapter(model)(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert type(model.backbone.layers[0].mixer.in_proj) is torch.nn.Linear


def test_part_adapter_round_trips_through_save_and_load(tmp_path):
    ids = torch.randint(2, 64, (2, 7))
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily(["in_proj.x", "x_proj.dt"], routing="causal"))
    randomise_adapter(model)
    with torch.no_grad():
        expected = model(ids).logits
    lily_ssm.save_adapter(model, tmp_path)
    loaded = lily_ssm.load_adapter(tiny_mamba("falcon"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)


def test_vim_backward_x_proj_parts_use_the_backward_dt_rank():
    from test_vim import images, tiny_vim

    model = tiny_vim()
    groups = {g.key: g for g in find_targets(model, ["x_proj_b.dt", "x_proj.C"])}
    rank = model.layers[0].mixer.dt_rank
    assert groups["x_proj_b.dt"].out_features == rank
    adapted = lily_ssm.apply_adapter(model, lily(["x_proj_b.dt", "x_proj.C"], routing="token"))
    randomise_adapter(adapted)
    assert adapted(images()).shape == (2, 5)


def test_mamba2_in_proj_parts_follow_its_packed_layout():
    """Mamba-2's in_proj is [z, x, B, C, dt], not Mamba-1's [x, z]: each part gets its own slice."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(vocab_size=64, hidden_size=16, state_size=8, num_hidden_layers=2, expand=2, head_dim=8,
                          num_heads=4, n_groups=1, conv_kernel=4)
    groups = {g.key: g for g in find_targets(Mamba2ForCausalLM(config), ["in_proj.z", "in_proj.x", "in_proj.B",
                                                                         "in_proj.C", "in_proj.dt"])}
    slices = {key: groups[key].modules[0].out_slice for key in groups}
    assert slices == {"in_proj.z": (0, 32), "in_proj.x": (32, 64), "in_proj.B": (64, 72), "in_proj.C": (72, 80),
                      "in_proj.dt": (80, 84)}
    with pytest.raises(ValueError, match="'in_proj.dt' has no output part|has no output part 'q'"):
        find_targets(Mamba2ForCausalLM(config), ["in_proj.q"])

"""The linear-recurrent hybrids on tiny configs: the gated-delta-rule families (Qwen3-Next, Qwen3.5, OLMo-Hybrid,
Kimi Linear) and LFM2's gated short convolution (LFM2, LFM2-MoE). transformers' own forwards call every projection
of their recurrent layers as a module; here every adapter on those projections (or on a part of a packed one) is
live on every path, cached decoding equals a full forward, and the ablation presets resolve at a matched budget."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_adapter

import lily_ssm
from lily_ssm.ablation.config import DEFAULT_SETS, TARGET_SETS, parse_ablation
from lily_ssm.tuners.budget import match_budget
from lily_ssm.tuners.liveness import DeadAdapterError

_GDN = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_conv_kernel_dim=4)
_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
_TYPES = dict(layer_types=["linear_attention", "full_attention"])
_CONFIGS = {  # (model class, config class, fields): 2 layers, the recurrent one first
    "qwen3_next": ("Qwen3NextForCausalLM", "Qwen3NextConfig", dict(
        **_GDN, **_ATTENTION, **_TYPES, head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
        shared_expert_intermediate_size=16)),
    "qwen3_5": ("Qwen3_5ForCausalLM", "Qwen3_5TextConfig", dict(**_GDN, **_ATTENTION, **_TYPES, head_dim=8)),
    "olmo_hybrid": ("OlmoHybridForCausalLM", "OlmoHybridConfig", dict(**_GDN, **_ATTENTION, **_TYPES)),
    "kimi_linear": ("KimiLinearForCausalLM", "KimiLinearConfig", dict(
        **_TYPES, num_attention_heads=4, num_key_value_heads=4, intermediate_size=48, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, linear_head_dim=8, linear_num_heads=4,
        mlp_layer_types=["dense", "dense"])),
    "lfm2": ("Lfm2ForCausalLM", "Lfm2Config", dict(**_ATTENTION, layer_types=["conv", "full_attention"],
                                                   conv_L_cache=3)),
    "lfm2_moe": ("Lfm2MoeForCausalLM", "Lfm2MoeConfig", dict(
        **_ATTENTION, layer_types=["conv", "full_attention"], conv_L_cache=3, moe_intermediate_size=16, num_experts=2,
        num_experts_per_tok=1, num_dense_layers=1)),
}
HYBRIDS = tuple(_CONFIGS)
# Kimi Linear's MLA attention layers also have a q_proj and an o_proj: its recurrent layer's are named by path.
_KDA = r"model\.layers\.0\.self_attn\.{}"
WHOLE = {  # every projection of the recurrent layer
    "qwen3_next": ["in_proj_qkvz", "in_proj_ba", "linear_attn.out_proj"],
    "qwen3_5": ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "linear_attn.out_proj"],
    "olmo_hybrid": [f"linear_attn.{n}_proj" for n in ("q", "k", "v", "g", "b", "a", "o")],
    "kimi_linear": [_KDA.format("q_proj"), "self_attn.k_proj", "self_attn.v_proj", "g_a_proj", "g_b_proj",
                    "self_attn.b_proj", "f_a_proj", "f_b_proj", _KDA.format("o_proj")],
    "lfm2": ["conv.in_proj", "conv.out_proj"],
    "lfm2_moe": ["conv.in_proj", "conv.out_proj"],
}
PARTS = {"qwen3_next": ["in_proj_qkvz.q", "in_proj_qkvz.k", "in_proj_qkvz.v", "in_proj_qkvz.z", "in_proj_ba.b",
                        "in_proj_ba.a"],
         "qwen3_5": ["in_proj_qkv.q", "in_proj_qkv.k", "in_proj_qkv.v"],
         "lfm2": ["conv.in_proj.B", "conv.in_proj.C", "conv.in_proj.x"],
         "lfm2_moe": ["conv.in_proj.B", "conv.in_proj.C", "conv.in_proj.x"]}
_KDA_ALL = _KDA.format(r"(q_proj|k_proj|v_proj|b_proj|g_a_proj|g_b_proj|o_proj|forget_gate\.f_a_proj|"
                       r"forget_gate\.f_b_proj)")
ALL = {**WHOLE, "kimi_linear": _KDA_ALL}  # one target list covering the whole recurrent layer
TABLES = {"qwen3_next": "language-qwen3-next", "qwen3_5": "language-qwen3.5", "olmo_hybrid": "language-olmo-hybrid",
          "kimi_linear": "language-kimi-linear", "lfm2": "language-lfm2", "lfm2_moe": "language-lfm2"}
IDS = torch.randint(2, 64, (2, 11), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[0, 0] + [1] * 9, [1] * 11])
GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)


def tiny_hybrid(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny transformers hybrid causal LM of family ``kind`` (one of HYBRIDS), built from its config."""
    import transformers

    model_cls, config_cls, fields = _CONFIGS[kind]
    if not hasattr(transformers, model_cls):  # a family newer than the installed transformers (the range's lower end)
        pytest.skip(f"transformers {transformers.__version__} has no {kind} ({model_cls})")
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=64, hidden_size=32, num_hidden_layers=2, pad_token_id=0,
                                               eos_token_id=1, bos_token_id=1, **fields)
    return getattr(transformers, model_cls)(config).eval()


def _lily(targets, **kw):
    return lily_ssm.LilyConfig(targets, r=3, num_A=1, num_B=3, **kw)


def _logits(model):
    """Logits on IDS in evaluation and in training mode."""
    found = []
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            found.append(model(IDS).logits)
    return found


@pytest.mark.parametrize("kind", HYBRIDS)
def test_adapters_start_at_the_base_and_each_target_changes_the_logits(kind):
    base = tiny_hybrid(kind)
    zero = lily_ssm.apply_adapter(copy.deepcopy(base), _lily(ALL[kind]))
    assert len(zero.lily_ssm_adapter.groups) >= len(WHOLE[kind])
    expected = _logits(base)
    for got, want in zip(_logits(zero), expected):
        assert torch.equal(got, want)
    for target in WHOLE[kind] + PARTS.get(kind, []):
        model = lily_ssm.apply_adapter(copy.deepcopy(base), _lily(target))  # a plain name or a regex
        randomise_adapter(model, std=1.0)
        for train, got, want in zip((False, True), _logits(model), expected):
            change = (got - want).abs().max()
            assert change > 1e-4, f"{target} (train={train}) changed the logits by {change}"


@pytest.mark.parametrize("kind", HYBRIDS)
def test_every_adapter_parameter_gets_a_gradient(kind):
    packed = {t.rsplit(".", 1)[0] for t in PARTS.get(kind, [])}
    targets = [t for t in WHOLE[kind] if t not in packed] + PARTS[kind] if kind in PARTS else ALL[kind]
    model = lily_ssm.apply_adapter(tiny_hybrid(kind), _lily(targets))
    randomise_adapter(model, std=0.3)
    model.train()
    model(IDS, attention_mask=MASK, labels=IDS).loss.backward()
    for name, param in model.lily_ssm_adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", HYBRIDS)
def test_cached_decoding_equals_a_full_forward_under_the_default_routing(kind):
    model = lily_ssm.apply_adapter(tiny_hybrid(kind), _lily(ALL[kind]))
    assert model.lily_ssm_adapter.config.routing == "causal"  # the default for a causal LM: no look-ahead
    randomise_adapter(model, std=0.5)
    with torch.no_grad():
        out = model.generate(IDS, attention_mask=MASK, output_logits=True, return_dict_in_generate=True, **GEN)
        assert torch.equal(model.generate(IDS, attention_mask=MASK, use_cache=False, **GEN), out.sequences)
        mask = torch.cat([MASK, torch.ones(2, GEN["max_new_tokens"], dtype=MASK.dtype)], 1)
        full = model(out.sequences, attention_mask=mask).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, IDS.shape[1] - 1 + step], atol=1e-4, rtol=1e-4)
    verified = {mode for m in model.modules() if getattr(m, "_lily_liveness", None) is not None
                for mode in m._lily_liveness.verified}
    assert (False, False, True, "cpu") in verified  # cached single-token decoding was checked live


def _unpacked(kind, layer, outputs):
    """The recurrent layer's own reading of its packed projections' outputs, by part name."""
    if kind == "qwen3_next":  # per key-head group, as transformers' forward unpacks them
        q, k, v, z, b, a = layer.fix_query_key_value_ordering(outputs["in_proj_qkvz"], outputs["in_proj_ba"])
        return dict(zip(("q", "k", "v", "z", "b", "a"), (q, k, v, z, b, a)))
    if kind == "qwen3_5":
        split = outputs["in_proj_qkv"].split([layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
        return dict(zip(("q", "k", "v"), split))
    return dict(zip(("B", "C", "x"), outputs["in_proj"].chunk(3, dim=-1)))  # LFM2: B, C, x = BCx.chunk(3)


def _layer0_outputs(model, kind):
    """Layer 0's packed projections on one input, called directly (the layer reads nothing else of the model)."""
    layer = next(m for n, m in model.named_modules() if n.endswith(("layers.0.linear_attn", "layers.0.conv")))
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outputs = {leaf: getattr(layer, leaf)(hidden) for leaf in ("in_proj_qkvz", "in_proj_ba", "in_proj_qkv",
                                                                   "in_proj") if hasattr(layer, leaf)}
    return _unpacked(kind, layer, outputs)


@pytest.mark.parametrize("method", ["lily", "lora"])
@pytest.mark.parametrize("kind,target", [(k, t) for k in ("qwen3_next", "qwen3_5", "lfm2") for t in PARTS[k]])
def test_a_part_adapter_changes_only_its_part(kind, target, method):
    """Read back as the layer reads its packed projections (Qwen3-Next interleaves per key-head group), only the
    targeted part differs from the base."""
    base = tiny_hybrid(kind)
    reference = _layer0_outputs(base, kind)
    config = _lily([target]) if method == "lily" else lily_ssm.LoraConfig([target], r=3, alpha=6.0)
    model = lily_ssm.apply_adapter(base, config)
    randomise_adapter(model)
    got = _layer0_outputs(model, kind)
    part = target.rsplit(".", 1)[1]
    for name, value in got.items():
        if name == part:
            assert (value - reference[name]).abs().max() > 1e-3, name
        else:
            torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)


def test_lora_on_interleaved_parts_merges_into_their_rows():
    model = lily_ssm.apply_adapter(tiny_hybrid("qwen3_next"), lily_ssm.LoraConfig(
        ["in_proj_qkvz.k", "in_proj_qkvz.z", "in_proj_ba.a"], r=3, alpha=6.0))
    randomise_adapter(model, std=0.3)
    with torch.no_grad():
        adapted = model(IDS).logits
        merged = lily_ssm.merge_adapter(model)(IDS).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_an_interleaved_part_adapter_round_trips_through_save_and_load(tmp_path):
    model = lily_ssm.apply_adapter(tiny_hybrid("qwen3_next"), _lily(["in_proj_qkvz.v", "in_proj_ba.b"]))
    randomise_adapter(model)
    with torch.no_grad():
        expected = model(IDS).logits
    lily_ssm.save_adapter(model, tmp_path)
    loaded = lily_ssm.load_adapter(tiny_hybrid("qwen3_next"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected)


@pytest.mark.parametrize("kind", HYBRIDS)
def test_a_bypassed_projection_of_the_recurrent_layer_is_refused(kind):
    """The liveness check covers these layers: were a path to compute with out_proj's weight instead of calling it
    (as transformers' Mamba kernels do), the first forward would name it."""
    model = lily_ssm.apply_adapter(tiny_hybrid(kind), _lily(ALL[kind]))
    name = next(n for n in model.lily_ssm_adapter.groups if n.endswith(("out_proj", "o_proj")))
    slot = model.lily_ssm_adapter.groups[name].modules[0].name
    projection = model.get_submodule(slot)
    projection.forward = lambda x, *args, **kwargs: F.linear(x, projection.weight, projection.bias)
    with pytest.raises(DeadAdapterError, match=rf"adapters on {slot.replace('.', '[.]')} did not run"):
        model(IDS)


@pytest.mark.parametrize("kind", HYBRIDS)
def test_each_ablation_preset_resolves_to_live_targets_at_a_matched_budget(kind, tmp_path):
    base = tiny_hybrid(kind)
    raw = {"ablation": {"output_dir": str(tmp_path), "budget": 4000}, "model": {"name_or_path": "unused"},
           "data": {"train_file": "unused.json"}, "training": {}, "evaluation": {"data_root": "unused"}}
    config = parse_ablation(raw)
    assert config.presets(base) == TABLES[kind]
    sets = config.target_sets(base)
    assert list(sets) == DEFAULT_SETS[TABLES[kind]] and set(sets) <= set(TARGET_SETS[TABLES[kind]])
    for name, targets in sets.items():
        lora = match_budget(base, {"method": "lora", "targets": targets}, 4000)
        assert abs(lora.deviation) <= 0.05, name
        lily = match_budget(base, {"method": "lily", "targets": targets, "num_A": 4, "num_B": 4}, 4000)
        model = lily_ssm.apply_adapter(copy.deepcopy(base), lily.config)
        assert sum(p.numel() for p in model.lily_ssm_adapter.parameters()) == lily.parameters
        randomise_adapter(model, std=1.0)
        with torch.no_grad():
            change = (model(IDS).logits - base(IDS).logits).abs().max()
        assert change > 1e-4, f"preset {name} ({targets}) moved the logits by {change}"


_KERNELS = {"fla": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}


@pytest.mark.cuda
@pytest.mark.parametrize("kind", HYBRIDS)
def test_the_kernel_paths_keep_every_adapter_live(kind):
    """On CUDA with flash-linear-attention and causal-conv1d, transformers' kernel paths (chunked and fused
    recurrent delta rule, causal convolution and its update) still call every projection: training gives every
    adapter parameter a gradient, and cached decoding equals the uncached one."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the kernel paths run on CUDA only")
    for module, package in _KERNELS.items():
        pytest.importorskip(module, reason=f"{package} does not import: transformers takes its PyTorch path")
    model = lily_ssm.apply_adapter(tiny_hybrid(kind).cuda(), _lily(ALL[kind]))
    randomise_adapter(model, std=0.3)
    ids, mask = IDS.cuda(), MASK.cuda()
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, **GEN)
        assert torch.equal(model.generate(ids, attention_mask=mask, use_cache=False, **GEN), cached)
    model.train()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    for name, param in model.lily_ssm_adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_env_lists_the_hybrid_families_with_their_path():
    from lily_ssm.env import path_lines

    lines = "\n".join(path_lines(cuda=False))
    for family in ("Qwen3-Next, Qwen3.5, OLMo-Hybrid", "Kimi Linear", "LFM2, LFM2-MoE"):
        assert f"{family}) on cpu: transformers' forward" in lines
    assert "Gated DeltaNet (Qwen3-Next, Qwen3.5, OLMo-Hybrid) on cpu: transformers' forward (every projection a " \
           "module), transformers' PyTorch gated delta rule, transformers' PyTorch convolution" in lines

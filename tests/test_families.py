"""Every SSM family transformers ships, on tiny configs: Jamba (Mamba-1 mixers) and the Mamba-2 family
(Mamba2, Bamba, Falcon-H1, Nemotron-H, Zamba2, GraniteMoeHybrid). lily-ssm's owned mixer forward
matches transformers' stock one; every adapter on the mixers is live on every path."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, amplify_ssm, assert_moves_logits, randomise_adapter, tiny_family

import lily_ssm
from lily_ssm.modules import patch_mamba_mixers
from lily_ssm.ops import conv as conv_ops
from lily_ssm.ops import kernels, ssd
from lily_ssm.ops import scan as scan_ops

MAMBA2 = [f for f in FAMILIES if f != "jamba"]
TARGETS = {"jamba": ["in_proj", "x_proj", "dt_proj", "out_proj", "in_proj.x", "x_proj.dt"],
           **{f: ["in_proj", "out_proj", "in_proj.z", "in_proj.x", "in_proj.B", "in_proj.C", "in_proj.dt"]
              for f in MAMBA2}}
ALL = {"jamba": ["in_proj", "x_proj", "dt_proj", "out_proj"], **{f: ["in_proj", "out_proj"] for f in MAMBA2}}
IDS = torch.randint(2, 64, (2, 13), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[0, 0, 0] + [1] * 10, [1] * 13])
GEN = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)


def _mixers(model):
    return [m for m in model.modules() if "forward" in m.__dict__]


def _lily(targets, routing="causal"):
    return lily_ssm.LilyConfig(targets, r=3, num_A=1, num_B=3, routing=routing)


def _group_ungrouped_norms(model):
    """Early transformers 5.x gated norms of Mamba-2, Bamba and GraniteMoeHybrid normalise over all of d_inner;
    mamba-ssm (which trained these models) and later transformers normalise per group of n_groups, and so does
    lily-ssm on every version. Give such a stock model the per-group norm, so both ends of the range compare one
    function."""
    for mixer in model.modules():
        norm, groups = getattr(mixer, "norm", None), getattr(mixer, "n_groups", 1)
        if groups == 1 or not type(norm).__name__.endswith("RMSNormGated") or hasattr(norm, "group_size") \
                or hasattr(norm, "n_groups"):
            continue

        def grouped(h, gate=None, norm=norm, groups=groups):
            h = h.float() * torch.nn.functional.silu(gate.float())
            h = h.reshape(*h.shape[:-1], groups, h.shape[-1] // groups)
            h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            return norm.weight * h.reshape(*h.shape[:-2], -1)

        norm.forward = grouped


@pytest.mark.parametrize("kind", FAMILIES)
def test_owned_forward_matches_transformers(kind):
    """No adapter: logits (padded too), the mixers' own outputs, loss and every gradient, and cached
    generation of lily-ssm's forward equal transformers' stock forward."""
    stock = tiny_family(kind)
    owned = copy.deepcopy(stock)
    assert patch_mamba_mixers(owned) >= 1
    _group_ungrouped_norms(stock)
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": MASK}):
            torch.testing.assert_close(owned(IDS, **kwargs).logits, stock(IDS, **kwargs).logits, atol=1e-5, rtol=1e-5)
        hidden = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(1))
        for ours, theirs in zip(_mixers(owned), [m for m in stock.modules() if type(m) in map(type, _mixers(owned))]):
            torch.testing.assert_close(ours(hidden, attention_mask=MASK), theirs(hidden, attention_mask=MASK),
                                       atol=1e-5, rtol=1e-4)
    stock.train(), owned.train()
    stock(IDS, attention_mask=MASK, labels=IDS).loss.backward()
    owned(IDS, attention_mask=MASK, labels=IDS).loss.backward()
    for (name, p), (_, q) in zip(stock.named_parameters(), owned.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    stock.eval(), owned.eval()
    with torch.no_grad():
        expected = stock.generate(IDS, attention_mask=MASK, **GEN)
        assert torch.equal(owned.generate(IDS, attention_mask=MASK, **GEN), expected)
        assert torch.equal(owned.generate(IDS, attention_mask=MASK, use_cache=False, **GEN), expected)


def test_falcon_h1_with_its_gated_norm_matches_transformers():
    stock = tiny_family("falcon_h1", mamba_rms_norm=True)
    owned = copy.deepcopy(stock)
    patch_mamba_mixers(owned)
    with torch.no_grad():
        torch.testing.assert_close(owned(IDS, attention_mask=MASK).logits, stock(IDS, attention_mask=MASK).logits,
                                   atol=1e-5, rtol=1e-5)


UNIT_MULTIPLIERS = {"ssm_multipliers": [1.0] * 5, "ssm_in_multiplier": 1.0, "ssm_out_multiplier": 1.0,
                    "attention_in_multiplier": 1.0, "attention_out_multiplier": 1.0, "key_multiplier": 1.0,
                    "mlp_multipliers": [1.0, 1.0], "embedding_multiplier": 1.0, "lm_head_multiplier": 1.0}


@pytest.mark.parametrize("kind", FAMILIES)
def test_adapters_start_at_the_base_and_each_target_changes_the_logits(kind):
    # Falcon-H1's μP multipliers at 1 and amplify_ssm: the smallest effect is ~2e-3, some 10^4 times float32
    # rounding, and the floor below sits far from both
    base = amplify_ssm(tiny_family(kind, **(UNIT_MULTIPLIERS if kind == "falcon_h1" else {})))
    patch_mamba_mixers(base)  # bit-identical to an adapted model whose B are zero
    zero = lily_ssm.apply_adapter(copy.deepcopy(base), _lily(ALL[kind]))
    with torch.no_grad():
        assert torch.equal(zero(IDS).logits, base(IDS).logits)
    for target in TARGETS[kind]:
        model = lily_ssm.apply_adapter(copy.deepcopy(base), _lily([target]))
        randomise_adapter(model, std=1.0)
        assert_moves_logits(model, base, IDS, 1e-4, target)


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_adapter_parameter_gets_a_gradient(kind):
    targets = [t for t in TARGETS[kind] if t not in ("in_proj", "x_proj")]  # a module whole or its parts
    model = lily_ssm.apply_adapter(tiny_family(kind), _lily(targets))
    randomise_adapter(model, std=0.3)
    model.train()
    model(IDS, attention_mask=MASK, labels=IDS).loss.backward()
    for name, param in model.lily_ssm_adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("routing", ["causal", "token", "sequence"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_cached_generation_equals_uncached(kind, routing):
    model = lily_ssm.apply_adapter(tiny_family(kind), _lily(ALL[kind], routing))
    randomise_adapter(model, std=0.5)
    with torch.no_grad():
        cached = model.generate(IDS, attention_mask=MASK, **GEN)
        assert torch.equal(model.generate(IDS, attention_mask=MASK, use_cache=False, **GEN), cached)


def _spy(calls, name, fn):
    def wrapped(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return fn(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("kind", ["jamba", "mamba2", "falcon_h1"])
def test_the_kernel_path_is_wired_with_adapters_live(kind):
    """With the CUDA kernels 'present' (references behind their signatures), the owned forwards call
    them in prefill and decoding, out_proj still runs as a module, and the results do not change."""
    model = lily_ssm.apply_adapter(tiny_family(kind), _lily(ALL[kind]))
    randomise_adapter(model, std=0.5)
    calls: dict[str, int] = {}
    if kind == "jamba":
        def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
            return scan_ops.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        fns = {"selective_scan_fn": scan, "selective_state_update": scan_ops.selective_state_update_ref}
    else:
        fns = {"mamba_chunk_scan_combined": ssd.ssd_scan_ref, "selective_state_update": ssd.ssd_state_update_ref}
    fns.update(causal_conv1d_fn=conv_ops.causal_conv1d_ref, causal_conv1d_update=conv_ops.causal_conv1d_update_ref)
    with torch.no_grad():
        expected = model.generate(IDS, **GEN)
        with kernels.override(**{name: _spy(calls, name, fn) for name, fn in fns.items()}):
            got = model.generate(IDS, **GEN)
    assert torch.equal(got, expected)
    mixers = len(_mixers(model))
    assert calls == {name: mixers * (1 if "update" not in name else GEN["max_new_tokens"] - 1) for name in fns}
    model.train()
    with kernels.override(**fns):  # the training path too: every adapter gets its gradient
        model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.lily_ssm_adapter.parameters())

"""Adapters on HF Mamba / Falcon-Mamba actually run: every projection, every path."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    MAMBA_TARGETS,
    amplify_ssm,
    assert_moves_logits,
    cache_kwargs,
    output_cache,
    randomise_adapter,
    tiny_mamba,
)

import lily_ssm
from lily_ssm.modules import patch_mamba_mixers
from lily_ssm.ops import conv as conv_ops
from lily_ssm.ops import kernels
from lily_ssm.ops import scan as scan_ops
from lily_ssm.utils.compat import enable_checkpointing

IDS = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def lily(targets, routing="causal", **kw):
    return lily_ssm.LilyConfig(list(targets), r=4, num_A=2, num_B=3, routing=routing, **kw)


def lora(targets):
    return lily_ssm.LoraConfig(list(targets), r=2, alpha=4.0)


def test_patched_forward_matches_transformers(mamba_kind):
    base = tiny_mamba(mamba_kind)
    patched = copy.deepcopy(base)
    assert patch_mamba_mixers(patched) == 3
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            torch.testing.assert_close(patched(IDS, **kwargs).logits, base(IDS, **kwargs).logits, atol=1e-5, rtol=0)
    base.train(), patched.train()
    torch.testing.assert_close(patched(IDS).logits, base(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make_config", [lily, lora], ids=["lily", "lora"])
def test_fresh_adapter_is_exactly_the_base(mamba_kind, make_config):
    base = tiny_mamba(mamba_kind)
    patch_mamba_mixers(base)
    adapted = lily_ssm.apply_adapter(copy.deepcopy(base), make_config(MAMBA_TARGETS))
    with torch.no_grad():
        assert torch.equal(adapted(IDS).logits, base(IDS).logits)


@pytest.mark.parametrize("targets", [(t,) for t in MAMBA_TARGETS] + [MAMBA_TARGETS], ids=lambda t: "+".join(t))
@pytest.mark.parametrize("make_config", [lily, lora], ids=["lily", "lora"])
def test_each_target_changes_logits_and_gets_gradients(mamba_kind, targets, make_config):
    base = amplify_ssm(tiny_mamba(mamba_kind))
    patch_mamba_mixers(base)  # bit-identical to the adapted model with zero adapters
    model = lily_ssm.apply_adapter(copy.deepcopy(base), make_config(targets))
    randomise_adapter(model, std=1.0)
    assert_moves_logits(model, base, IDS, 1e-4, "+".join(targets))
    model.train()
    randomise_adapter(model, std=0.3)  # at std 1 some routers saturate: their gradient underflows to 0
    model(IDS, labels=IDS).loss.backward()
    for name, param in model.lily_ssm_adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if "lily_ssm_adapter" not in n)


def _logits_alone_and_padded(model, side):
    """Logits of sample 0 alone, and inside a batch where it is padded on ``side``."""
    short = IDS[0, :5]
    other = IDS[1]
    pad = torch.zeros(4, dtype=torch.long)
    padded = torch.cat([pad, short]) if side == "left" else torch.cat([short, pad])
    valid = torch.cat([torch.zeros(4), torch.ones(5)]) if side == "left" else torch.cat([torch.ones(5), torch.zeros(4)])
    batch = torch.stack([padded, other])
    mask = torch.stack([valid, torch.ones(9)]).long()
    with torch.no_grad():
        alone = model(short[None]).logits[0]
        together = model(batch, attention_mask=mask).logits[0]
    together = together[4:] if side == "left" else together[:5]
    return alone, together


@pytest.mark.parametrize("routing", ["sequence", "causal", "token"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_and_padding_invariance(mamba_kind, routing, side):
    model = lily_ssm.apply_adapter(tiny_mamba(mamba_kind), lily(MAMBA_TARGETS, routing))
    randomise_adapter(model, std=0.5)
    alone, together = _logits_alone_and_padded(model, side)
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-5)


def test_batch_routing_does_depend_on_the_batch():
    # The published code's mode, kept for reproduction only: padding and neighbours leak into the mix.
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily(MAMBA_TARGETS, "batch"))
    randomise_adapter(model, std=0.5)
    alone, together = _logits_alone_and_padded(model, "right")
    assert not torch.allclose(together, alone, atol=1e-4)


def _generate(model, ids, mask, use_cache):
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                          pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("routing", ["sequence", "causal", "token"])
def test_cached_generation_matches_uncached(mamba_kind, routing):
    model = lily_ssm.apply_adapter(tiny_mamba(mamba_kind), lily(MAMBA_TARGETS, routing))
    randomise_adapter(model, std=0.5)
    ids = IDS.clone()
    ids[0, :3] = 0
    mask = (torch.arange(9) >= 3).long()[None].repeat(2, 1)
    mask[1] = 1
    with torch.no_grad():
        cached, uncached = _generate(model, ids, mask, True), _generate(model, ids, mask, False)
    assert torch.equal(cached, uncached)
    # the generated tokens really depend on the adapter (else the test would prove nothing)
    base = tiny_mamba(mamba_kind)
    with torch.no_grad():
        assert not torch.equal(_generate(base, ids, mask, True), cached)


@pytest.mark.parametrize("routing", ["causal", "token"])
def test_cached_decoding_steps_equal_full_forward(routing):
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily(MAMBA_TARGETS, routing))
    randomise_adapter(model, std=0.5)
    with torch.no_grad():
        full = model(IDS).logits
        out = model(IDS[:, :5], use_cache=True)
        steps = [out.logits]
        cache = output_cache(out)
        for t in range(5, 9):
            out = model(IDS[:, t : t + 1], use_cache=True, **cache_kwargs(model, cache))
            cache = output_cache(out)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-5)


def test_beam_search_with_cache_matches_uncached():
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily(MAMBA_TARGETS, "causal"))
    randomise_adapter(model, std=0.5)
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(IDS, use_cache=True, **kwargs)
        assert torch.equal(cached, model.generate(IDS, use_cache=False, **kwargs))


def test_scan_and_conv_dispatch_to_kernels_when_present():
    """With kernels 'present' (reference functions behind the kernel signatures), the mixer calls them."""
    calls: dict[str, int] = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapped

    def scan_kernel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    return_last_state=False):
        return scan_ops.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily(MAMBA_TARGETS, "causal"))
    randomise_adapter(model)
    with torch.no_grad():
        expected = model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
        with kernels.override(
            selective_scan_fn=spy("scan", scan_kernel),
            selective_state_update=spy("update", scan_ops.selective_state_update_ref),
            causal_conv1d_fn=spy("conv", conv_ops.causal_conv1d_ref),
            causal_conv1d_update=spy("conv_update", conv_ops.causal_conv1d_update_ref),
        ):
            got = model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    assert calls == {"scan": 3, "conv": 3, "update": 6, "conv_update": 6}


@pytest.mark.parametrize("routing", ["sequence", "causal"])
def test_gradient_checkpointing_recomputes_with_the_same_routing(routing):
    """Block recomputation in backward (the memory saving mamba_inner_fn offers) keeps adapters and masks."""
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily(MAMBA_TARGETS, routing))
    randomise_adapter(model)
    checkpointed = copy.deepcopy(model)
    enable_checkpointing(checkpointed)
    mask = torch.ones_like(IDS)
    mask[0, :4] = 0
    labels = IDS.masked_fill(torch.arange(IDS.shape[1]) < 6, -100)  # a prompt for sequence routing to pool
    for m in (model, checkpointed):
        m.train()
        m(IDS, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), (_, q) in zip(model.lily_ssm_adapter.named_parameters(),
                                 checkpointed.lily_ssm_adapter.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_generate_with_inputs_keyword_pins_sequence_routing_to_the_prompt():
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily(MAMBA_TARGETS, "sequence"))
    randomise_adapter(model, std=0.5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(inputs=IDS, use_cache=True, **kwargs)
        uncached = model.generate(inputs=IDS, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_regex_targets_keep_only_linear_layers():
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily_ssm.LilyConfig(r"backbone\.layers\.\d+\.mixer\..*",
                                                                             r=2, num_A=1, num_B=2))
    assert set(model.lily_ssm_adapter.pools) == set(MAMBA_TARGETS)  # conv1d, norms and A_log are not Linear


def test_pools_follow_an_offloaded_module_to_its_execution_device():
    from types import SimpleNamespace

    from lily_ssm.tuners.model import _pool_dtype_device

    with torch.device("meta"):
        linear = torch.nn.Linear(4, 4, dtype=torch.bfloat16)
    assert _pool_dtype_device(linear) == (torch.float32, torch.device("meta"))  # meta model: shapes only
    linear._hf_hook = SimpleNamespace(execution_device="cpu")
    assert _pool_dtype_device(linear) == (torch.float32, torch.device("cpu"))

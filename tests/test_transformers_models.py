"""Lily / LoRA on Transformers models: parity with PEFT, injection, error messages, generation.

Every model is a tiny, randomly initialised one built from its config (no hub access).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomise_adapter, tiny_llama
from torch import nn

import lily_ssm
from lily_ssm.tuners import AdaptedLinear

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
PARITY_TARGETS = ["q_proj", "v_proj"]
PARITY_SCALING = 0.5

# PEFT 0.21 calls a transformers API that transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _tokens(batch: int, length: int, seed: int, low: int = 2, high: int = 64) -> torch.Tensor:
    """Token ids that avoid the tiny models' special ids (0 and 1)."""
    return torch.randint(low, high, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# 1. Numerical parity with PEFT's LilyConfig (routing="batch", one router per layer)
# --------------------------------------------------------------------------------------------------


def _peft_lily_layers(peft_model: nn.Module, target: str) -> list[nn.Module]:
    from peft.tuners.lily.layer import LilyLayer

    layers = [m for n, m in peft_model.named_modules() if isinstance(m, LilyLayer) and n.endswith("." + target)]
    assert len(layers) == 4, f"expected one PEFT Lily layer per decoder layer for {target}"
    return layers  # traversal order is layer order


@pytest.fixture(scope="module")
def peft_pair():
    """(base, PEFT Lily model, our Lily model) sharing base weights and adapter weights."""
    from peft import LilyConfig as PeftLilyConfig
    from peft import get_peft_model

    base = tiny_llama(layers=4)
    peft_config = PeftLilyConfig(r=4, stride_A=2, num_B=3, target_modules=PARITY_TARGETS, scaling=PARITY_SCALING)
    peft_model = get_peft_model(copy.deepcopy(base), peft_config).eval()
    ours = lily_ssm.apply_adapter(
        copy.deepcopy(base),
        lily_ssm.LilyConfig(PARITY_TARGETS, r=4, num_A=2, num_B=3, routing="batch", router="layer",
                            scaling=PARITY_SCALING),
    )

    # PEFT zero-initialises B: give every (deduplicated) adapter tensor random values.
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        lily_params = [p for n, p in peft_model.named_parameters() if "lily_" in n]
        assert lily_params
        for param in lily_params:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)

    pools = ours.lily_ssm_adapter.pools
    assert set(pools.keys()) == set(PARITY_TARGETS)
    with torch.no_grad():
        for target in PARITY_TARGETS:
            layers = _peft_lily_layers(peft_model, target)
            a = [layer.lily_A["default"] for layer in layers]
            b = [layer.lily_B["default"] for layer in layers]
            # The layout this copy relies on: A shared by stride_A=2 consecutive layers, B by all of them.
            assert a[0] is a[1] and a[2] is a[3] and a[0] is not a[2]
            assert all(m is b[0] for m in b)

            pool = pools[target]
            assert pool.A.shape == (2, 32, 4) and pool.router.shape == (4, 3, 4)
            for g in range(2):
                pool.A[g].copy_(a[2 * g].weight.T)  # nn.Linear(in, r).weight is (r, in)
            pool.B.copy_(b[0].weight.reshape(3, 4, pool.B.shape[-1]))  # (num_B*r, out) -> (num_B, r, out)
            for position, layer in enumerate(layers):
                pool.router[position].copy_(layer.lily_router["default"].weight)  # (num_B, r)
    return base, peft_model, ours


def _parity_inputs(case: str) -> dict[str, torch.Tensor]:
    if case == "single":
        return {"input_ids": _tokens(1, 7, seed=0)}
    ids = _tokens(3, 7, seed=1)
    mask = torch.ones_like(ids)
    if case == "left_padded":
        mask[0, :3] = 0
        mask[2, :1] = 0
    elif case == "right_padded":
        mask[1, 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("case", ["single", "batch_unpadded", "left_padded", "right_padded"])
def test_logits_match_peft_lily(peft_pair, case):
    base, peft_model, ours = peft_pair
    inputs = _parity_inputs(case)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        got = ours(**inputs).logits
        base_logits = base(**inputs).logits
    assert (expected - base_logits).abs().max() > 1e-2, "the PEFT adapter should change the logits"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_gradients_match_peft_lily(peft_pair):
    """One forward / backward over a padded batch of 3: same loss, same adapter gradients."""
    _, peft_model, ours = peft_pair
    inputs = _parity_inputs("left_padded")
    weights = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(5))

    peft_loss = (peft_model(**inputs).logits * weights).sum()
    our_loss = (ours(**inputs).logits * weights).sum()
    torch.testing.assert_close(our_loss, peft_loss, atol=1e-4, rtol=1e-6)

    for target in PARITY_TARGETS:
        layers = _peft_lily_layers(peft_model, target)
        pool = ours.lily_ssm_adapter.pools[target]
        peft_a = [layers[0].lily_A["default"].weight, layers[2].lily_A["default"].weight]
        peft_b = layers[0].lily_B["default"].weight
        peft_r = [layer.lily_router["default"].weight for layer in layers]
        peft_grads = torch.autograd.grad(peft_loss, [*peft_a, peft_b, *peft_r], retain_graph=True)
        our_a, our_b, our_r = torch.autograd.grad(our_loss, [pool.A, pool.B, pool.router], retain_graph=True)

        for g in range(2):
            torch.testing.assert_close(our_a[g], peft_grads[g].T, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(our_b, peft_grads[2].reshape(our_b.shape), atol=1e-4, rtol=1e-4)
        for position in range(4):
            torch.testing.assert_close(our_r[position], peft_grads[3 + position], atol=1e-4, rtol=1e-4)


def _peft_and_ours_with_stride(stride: int, layers: int, ours_config: lily_ssm.LilyConfig):
    """PEFT Lily with ``stride_A`` and our Lily, sharing base and adapter weights; PEFT's A experts are
    copied onto ours in PEFT's grouping (layer ℓ uses A number ℓ // stride)."""
    from peft import LilyConfig as PeftLilyConfig
    from peft import get_peft_model

    base = tiny_llama(layers=layers)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLilyConfig(r=4, stride_A=stride, num_B=3,
                                                                     target_modules=["q_proj"])).eval()
    ours = lily_ssm.apply_adapter(copy.deepcopy(base), ours_config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in (p for n, p in peft_model.named_parameters() if "lily_" in n):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        from peft.tuners.lily.layer import LilyLayer

        peft_layers = [m for n, m in peft_model.named_modules() if isinstance(m, LilyLayer)]
        pool = ours.lily_ssm_adapter.pools["q_proj"]
        for position, layer in enumerate(peft_layers):
            pool.A[min(position // stride, pool.A.shape[0] - 1)].copy_(layer.lily_A["default"].weight.T)
            pool.router[position].copy_(layer.lily_router["default"].weight)
        pool.B.copy_(peft_layers[0].lily_B["default"].weight.reshape(pool.B.shape))
    return peft_model, ours


def test_stride_grouping_matches_peft_where_no_num_a_does():
    """6 layers, stride_A=4: PEFT gives layers 0-3 A number 0 and layers 4-5 A number 1. Balanced blocks
    (floor(ℓ·num_A/L)) cannot express that; ``stride_A=4`` can, and gives PEFT's logits."""
    inputs = _parity_inputs("left_padded")
    config = {"targets": ["q_proj"], "r": 4, "num_A": 2, "num_B": 3, "routing": "batch"}
    peft_model, ours = _peft_and_ours_with_stride(4, 6, lily_ssm.LilyConfig(**config, stride_A=4))
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        torch.testing.assert_close(ours(**inputs).logits, expected, atol=1e-5, rtol=0)
        for num_a in range(1, 7):  # no balanced grouping reproduces PEFT's
            _, balanced = _peft_and_ours_with_stride(4, 6, lily_ssm.LilyConfig(**{**config, "num_A": num_a}))
            assert (balanced(**inputs).logits - expected).abs().max() > 1e-3, num_a


def test_stride_a_needs_the_matching_num_a():
    with pytest.raises(ValueError, match=r"stride_A=4 for target 'q_proj' groups its 6 layers into 2 A experts.*"
                                         r"set num_A=2, not 3"):
        lily_ssm.apply_adapter(tiny_llama(layers=6), lily_ssm.LilyConfig(["q_proj"], r=2, num_A=3, num_B=2,
                                                                         stride_A=4))


# --------------------------------------------------------------------------------------------------
# 2. Injection into LLaMA, RoBERTa and ViT
# --------------------------------------------------------------------------------------------------


def _llama():
    ids = _tokens(2, 6, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return tiny_llama(layers=4), {"input_ids": ids, "attention_mask": mask}, LLAMA_TARGETS, set(LLAMA_TARGETS), 4


def _roberta_config():
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
                         num_labels=3)


def _roberta_inputs(config) -> dict[str, torch.Tensor]:
    ids = _tokens(3, 8, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, config.pad_token_id), "attention_mask": mask}


def _roberta():
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(0)
    config = _roberta_config()
    targets = ["query", "key", "value"]
    return RobertaForSequenceClassification(config).eval(), _roberta_inputs(config), targets, set(targets), 3


def _roberta_dense():
    """RoBERTa's `dense` is the attention output (32->32), MLP up (32->48) and MLP down (48->32) projection."""
    from transformers import RobertaModel

    torch.manual_seed(0)
    config = _roberta_config()
    model = RobertaModel(config, add_pooling_layer=False).eval()
    keys = {"query", "key", "value", "dense[32x32]", "dense[32x48]", "dense[48x32]"}
    return model, _roberta_inputs(config), ["query", "key", "value", "dense"], keys, 3


def _vit():
    # transformers 5 names ViT's projections q_proj / k_proj / v_proj / o_proj and mlp.fc1 / mlp.fc2.
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=64, num_labels=3)
    model = ViTForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    targets = ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]
    return model, {"pixel_values": pixels}, targets, set(targets), 3


MODELS = {"llama": _llama, "roberta": _roberta, "roberta_dense": _roberta_dense, "vit": _vit}


def _config(method: str, targets: list[str]):
    if method == "lily":
        return lily_ssm.LilyConfig(targets, r=4, num_A=2, num_B=3)
    return lily_ssm.LoraConfig(targets, r=4, alpha=8.0)


def _output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if "logits" in out else out.last_hidden_state


@pytest.mark.parametrize("method", ["lily", "lora"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_injection(arch, method):
    model, inputs, targets, expected_keys, num_layers = MODELS[arch]()
    target_names = {n for n, m in model.named_modules() if type(m) is nn.Linear and n.rsplit(".", 1)[-1] in targets}
    with torch.no_grad():
        base_out = _output(model, inputs)

    lily_ssm.apply_adapter(model, _config(method, targets))
    state = model.lily_ssm_adapter
    assert set(state.pools.keys()) == expected_keys
    adapted = {n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    assert adapted == target_names
    assert len(adapted) == num_layers * len(expected_keys)
    if method == "lily":
        for key, pool in state.pools.items():
            group = state.groups[key]
            assert group.num_layers == num_layers
            assert pool.A.shape == (2, group.in_features, 4)
            assert pool.B.shape == (3, 4, group.out_features)
            assert pool.router.shape == (num_layers, 3, 4)

    # Freshly injected: exactly the base model.
    with torch.no_grad():
        fresh_out = _output(model, inputs)
    assert torch.equal(fresh_out, base_out)

    # Base frozen, adapter trainable, nothing else trainable.
    named = dict(model.named_parameters())
    adapter_names = {n for n in named if n.startswith("lily_ssm_adapter.")}
    assert adapter_names and len(adapter_names) < len(named)
    for name, param in named.items():
        assert param.requires_grad == (name in adapter_names), name

    # Non-zero adapter: the output changes and every adapter tensor (every expert / per-layer slice) learns.
    randomise_adapter(model, std=0.1)
    out = _output(model, inputs)
    assert not torch.allclose(out, base_out, atol=1e-4)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    (out * weights).sum().backward()
    for name in adapter_names:
        grad = named[name].grad
        assert grad is not None, name
        per_slice = grad.reshape(grad.shape[0], -1).abs().amax(dim=1)
        zero = torch.nonzero(per_slice == 0).flatten().tolist()
        assert not zero, f"{name}: zero gradient for slice(s) {zero}"
    for name, param in named.items():
        if name not in adapter_names:
            assert param.grad is None, name


@pytest.mark.parametrize("routing", ["sequence", "causal"])
def test_padding_does_not_silence_adapter_on_pooled_input(routing):
    """RoBERTa's pooler adapts the [CLS] vector, a 2-D ``(batch, hidden)`` input (so does the classification
    head's ``classifier.dense``). A right-padded sample must get the same output in a padded batch as alone:
    its [CLS] token is valid, so padding elsewhere in the sequence must not change its router mix."""
    from transformers import RobertaModel

    torch.manual_seed(0)
    config = _roberta_config()
    model = lily_ssm.apply_adapter(RobertaModel(config).eval(),
                                   lily_ssm.LilyConfig(["dense"], r=4, num_A=2, num_B=3, routing=routing))
    assert "pooler.dense" in {m.name for g in model.lily_ssm_adapter.groups.values() for m in g.modules}
    randomise_adapter(model, std=0.1)
    inputs = _roberta_inputs(config)
    with torch.no_grad():
        batched = model(**inputs)
        for row in range(3):
            n = int(inputs["attention_mask"][row].sum())
            alone = model(input_ids=inputs["input_ids"][row:row + 1, :n],
                          attention_mask=inputs["attention_mask"][row:row + 1, :n])
            # The encoder's adapters (3-D inputs) handle padding correctly ...
            torch.testing.assert_close(batched.last_hidden_state[row, :n], alone.last_hidden_state[0],
                                       atol=1e-5, rtol=1e-5)
            # ... the pooler's (2-D input) must too.
            torch.testing.assert_close(batched.pooler_output[row], alone.pooler_output[0], atol=1e-5, rtol=1e-5,
                                       msg=lambda m, row=row: f"pooler output of sample {row} (padded in batch "
                                                              f"vs alone):\n{m}")


# --------------------------------------------------------------------------------------------------
# 3. Error messages
# --------------------------------------------------------------------------------------------------


def _assert_untouched(model: nn.Module) -> None:
    """A failed apply_adapter leaves the model as it was: no adapter, nothing frozen, nothing wrapped."""
    assert not hasattr(model, "lily_ssm_adapter")
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())


@pytest.mark.parametrize("method", ["lily", "lora"])
def test_unknown_target_lists_linear_layers(method):
    model = tiny_llama()
    with pytest.raises(ValueError, match="nonexistent_proj") as info:
        lily_ssm.apply_adapter(model, _config(method, ["q_proj", "nonexistent_proj"]))
    message = str(info.value)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message
    _assert_untouched(model)


@pytest.mark.parametrize("target", ["embed_tokens", "input_layernorm"])
def test_non_linear_target(target):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"nn\.Linear") as info:
        lily_ssm.apply_adapter(model, _config("lily", ["q_proj", target]))
    assert target in str(info.value)
    _assert_untouched(model)


@pytest.mark.parametrize("second", ["lily", "lora"])
def test_apply_twice(second):
    model = lily_ssm.apply_adapter(tiny_llama(), _config("lily", ["q_proj"]))
    pools = model.lily_ssm_adapter.pools
    with pytest.raises(ValueError, match="already has an adapter"):
        lily_ssm.apply_adapter(model, _config(second, ["v_proj"]))
    assert model.lily_ssm_adapter.pools is pools
    assert set(pools.keys()) == {"q_proj"}
    assert not isinstance(model.model.layers[0].self_attn.v_proj, AdaptedLinear)


def test_invalid_routing_mode():
    model = tiny_llama()
    with pytest.raises(ValueError, match="tokens") as info:
        lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["q_proj"], r=4, num_A=2, num_B=3, routing="tokens"))
    for mode in ("sequence", "causal", "token", "batch"):
        assert mode in str(info.value)
    _assert_untouched(model)


def test_num_a_larger_than_layers():
    model = tiny_llama(layers=4)
    with pytest.raises(ValueError, match=r"num_A=5.*only 4 layers"):
        lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["q_proj"], r=4, num_A=5, num_B=3))
    _assert_untouched(model)
    # The same, set per target type through an override.
    config = lily_ssm.LilyConfig(["q_proj", "v_proj"], r=4, num_A=2, num_B=3, overrides={"v_proj": {"num_A": 5}})
    with pytest.raises(ValueError, match=r"num_A=5 for target 'v_proj'"):
        lily_ssm.apply_adapter(model, config)
    _assert_untouched(model)
    # num_A == L (one A per layer) is fine.
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["q_proj"], r=4, num_A=4, num_B=3))
    assert model.lily_ssm_adapter.pools["q_proj"].A.shape[0] == 4


# --------------------------------------------------------------------------------------------------
# 4. Generation: cached decoding equals uncached decoding, padding does not vote
# --------------------------------------------------------------------------------------------------

PROMPTS = torch.tensor([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]])  # left padded (pad_token_id=0)
PROMPT_MASK = (PROMPTS != 0).long()
NEW_TOKENS = 6


def _generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool, **kwargs) -> torch.Tensor:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache,
                         pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def base_generation():
    return _generate(tiny_llama(), PROMPTS, PROMPT_MASK, use_cache=True)


def _lily_llama(routing: str) -> nn.Module:
    model = lily_ssm.apply_adapter(tiny_llama(), lily_ssm.LilyConfig(LLAMA_TARGETS, r=4, num_A=2, num_B=3,
                                                                     routing=routing))
    randomise_adapter(model, std=0.1)
    return model


@pytest.mark.parametrize("routing", ["causal", "sequence", "token"])
def test_generate_cached_equals_uncached(routing, base_generation):
    model = _lily_llama(routing)
    cached = _generate(model, PROMPTS, PROMPT_MASK, use_cache=True)
    uncached = _generate(model, PROMPTS, PROMPT_MASK, use_cache=False)
    assert cached.shape == (2, NEW_TOKENS)
    assert torch.equal(cached, uncached), f"cached {cached.tolist()} != uncached {uncached.tolist()}"
    assert not torch.equal(cached, base_generation), "the adapter should change what is generated"

    # Padding does not vote: each prompt generates the same tokens alone, unpadded.
    for row in range(2):
        keep = PROMPT_MASK[row].bool()
        alone = _generate(model, PROMPTS[row:row + 1, keep], PROMPT_MASK[row:row + 1, keep], use_cache=True)
        assert torch.equal(alone[0], cached[row]), f"row {row}: alone {alone.tolist()} vs batched {cached.tolist()}"


@pytest.mark.parametrize("routing", ["causal", "sequence"])
def test_beam_search_cached_equals_uncached(routing):
    """Beam search reorders the cache; the router statistics kept on it must follow."""
    model = _lily_llama(routing)
    cached = _generate(model, PROMPTS, PROMPT_MASK, use_cache=True, num_beams=3)
    uncached = _generate(model, PROMPTS, PROMPT_MASK, use_cache=False, num_beams=3)
    assert torch.equal(cached, uncached), f"cached {cached.tolist()} != uncached {uncached.tolist()}"


# --------------------------------------------------------------------------------------------------
# 5. Routing state outside one model call: deep copies, the returned cache
# --------------------------------------------------------------------------------------------------


def _copied_and_reference():
    """A deep copy of an adapted model with its adapter scaled by 3, and a never-copied model with the same weights."""
    model = _lily_llama("sequence")
    clone = copy.deepcopy(model)
    reference = _lily_llama("sequence")
    with torch.no_grad():
        for params in (clone.lily_ssm_adapter.parameters(), reference.lily_ssm_adapter.parameters()):
            for param in params:
                param.mul_(3.0)
    return model, clone, reference


def test_deepcopy_routes_with_its_own_mask():
    """A deep copy (EMA, checkpoint averaging, ...) must see the attention mask of its own calls."""
    _, clone, reference = _copied_and_reference()
    with torch.no_grad():
        expected = reference(PROMPTS, attention_mask=PROMPT_MASK).logits
        got = clone(PROMPTS, attention_mask=PROMPT_MASK).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_deepcopy_generates_with_its_own_weights():
    model, clone, reference = _copied_and_reference()
    expected = _generate(reference, PROMPTS, PROMPT_MASK, use_cache=True)
    original = _generate(model, PROMPTS, PROMPT_MASK, use_cache=True)
    assert not torch.equal(expected, original)
    got = _generate(clone, PROMPTS, PROMPT_MASK, use_cache=True)
    assert torch.equal(got, expected), (
        f"the copy generated {got.tolist()}, expected {expected.tolist()} (the original model generates "
        f"{original.tolist()})"
    )


def test_uncached_forward_logs_no_cache_deprecation_warning():
    """The routing hook looks for the returned cache; with ``use_cache=False`` it must not trip transformers'
    "`past_key_values`/`cache_params` are deprecated" warning (the base model does not log it)."""
    import logging

    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = hf_logging.get_logger("transformers")
    hf_logger.addHandler(handler)
    # transformers' warning_once is an lru_cache on Logger: forget what was already logged this session.
    getattr(logging.Logger.warning_once, "cache_clear", lambda: None)()
    try:
        with torch.no_grad():
            tiny_llama()(PROMPTS, attention_mask=PROMPT_MASK, use_cache=False)
            base_messages = [r.getMessage() for r in records]
            _lily_llama("sequence")(PROMPTS, attention_mask=PROMPT_MASK, use_cache=False)
    finally:
        hf_logger.removeHandler(handler)
    assert not [m for m in base_messages if "past_key_values" in m]
    messages = [r.getMessage() for r in records]
    assert not [m for m in messages if "past_key_values" in m], messages

"""Tiny randomly initialised models built from configs (no hub access anywhere)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

MAMBA_TARGETS = ("in_proj", "dt_proj", "x_proj", "out_proj")


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path_factory, monkeypatch):
    """Every test runs in a fresh empty working directory: nothing a user created in the checkout (runs/,
    lily-quickstart/, ...) can change an outcome, and nothing a test writes by a relative path lands there."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def output_cache(output):
    """The decoding cache a transformers model returned (``cache`` from 5.24, ``cache_params`` before)."""
    return output["cache"] if "cache" in output else output["cache_params"]


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """The keyword that hands ``cache`` back to ``model``: ``cache`` from transformers 5.24, ``cache_params`` before."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "cache_params": cache}


def tiny_mamba(kind: str = "falcon", layers: int = 3, seed: int = 0, vocab: int = 64) -> torch.nn.Module:
    """A tiny HF Mamba-1 causal LM: ``kind`` is ``falcon`` (FalconMambaForCausalLM) or ``mamba``."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    cfg_cls, model_cls = {
        "falcon": (FalconMambaConfig, FalconMambaForCausalLM),
        "mamba": (MambaConfig, MambaForCausalLM),
    }[kind]
    config = cfg_cls(vocab_size=vocab, hidden_size=16, state_size=4, num_hidden_layers=layers,
                     intermediate_size=32, time_step_rank=4, conv_kernel=4, pad_token_id=0, eos_token_id=1,
                     bos_token_id=1)
    return model_cls(config).eval()


def tiny_llama(layers: int = 4, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config).eval()


# transformers' SSM families other than Mamba / Falcon-Mamba: Jamba (Mamba-1 mixers) and the Mamba-2 family.
FAMILIES = ("jamba", "mamba2", "bamba", "falcon_h1", "nemotron_h", "zamba2", "granitemoehybrid")


_MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
               mamba_chunk_size=8)
_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
_FAMILY_CONFIGS = {  # (model class, config class, config fields): 2-3 layers, at least one SSM mixer
    "jamba": ("JambaForCausalLM", "JambaConfig", dict(
        num_hidden_layers=3, **_ATTENTION, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=3,
        expert_layer_offset=2, num_experts=2, num_experts_per_tok=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
        mamba_dt_rank=4)),
    "mamba2": ("Mamba2ForCausalLM", "Mamba2Config", dict(
        num_hidden_layers=2, state_size=8, expand=2, num_heads=8, head_dim=8, n_groups=2, chunk_size=8, conv_kernel=4)),
    "bamba": ("BambaForCausalLM", "BambaConfig", dict(num_hidden_layers=3, **_ATTENTION, attn_layer_indices=[1],
                                                       **_MAMBA2)),
    "falcon_h1": ("FalconH1ForCausalLM", "FalconH1Config", dict(num_hidden_layers=2, **_ATTENTION, **_MAMBA2,
                                                                 mamba_d_ssm=64)),
    "nemotron_h": ("NemotronHForCausalLM", "NemotronHConfig", dict(
        num_hidden_layers=3, hybrid_override_pattern="M*M", **_ATTENTION, mamba_num_heads=8, mamba_head_dim=8,
        n_groups=2, ssm_state_size=8, conv_kernel=4, expand=2, chunk_size=8)),
    "zamba2": ("Zamba2ForCausalLM", "Zamba2Config", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, intermediate_size=48, mamba_headdim=8,
        n_mamba_heads=8, mamba_ngroups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, chunk_size=8,
        layers_block_type=["mamba", "hybrid", "mamba"], num_mem_blocks=1, use_shared_attention_adapter=False)),
    "granitemoehybrid": ("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig", dict(
        num_hidden_layers=3, **_ATTENTION, layer_types=["mamba", "attention", "mamba"], **_MAMBA2,
        num_local_experts=0, shared_intermediate_size=48)),
}


def tiny_family(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny transformers SSM causal LM of family ``kind`` (one of FAMILIES), built from its config."""
    import transformers

    model_cls, config_cls, fields = _FAMILY_CONFIGS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=64, hidden_size=32, pad_token_id=0, eos_token_id=1,
                                               bos_token_id=1, **{**fields, **overrides})
    return getattr(transformers, model_cls)(config).eval()


def byte_level_falcon(seed: int = 0):
    """A tiny random Falcon-Mamba over a byte-level tokenizer that gives every text back as written."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import FalconMambaConfig, FalconMambaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<eos>")
    torch.manual_seed(seed)
    config = FalconMambaConfig(vocab_size=len(vocab), hidden_size=16, state_size=4, num_hidden_layers=2,
                               intermediate_size=32, time_step_rank=4, conv_kernel=4, pad_token_id=0,
                               eos_token_id=1, bos_token_id=1)
    return FalconMambaForCausalLM(config).eval(), tokenizer


def randomise_adapter(model: torch.nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """Give every adapter tensor non-zero values (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.lily_ssm_adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def amplify_ssm(model: torch.nn.Module) -> torch.nn.Module:
    """Make what enters a tiny model's recurrent state show in its logits: at initialisation its SSM branches barely
    reach them (convolutions of std 0.02, steps of Δ ≈ 0.01), so some adapters moved the logits by ~1e-7, the size of
    float32 rounding, and liveness checks passed or failed by CPU. With Δ ≈ 1.3 and convolutions of std 0.5 every
    target's effect is ~1e-3 or more."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("dt_bias", "dt_proj.bias", "dt_proj_b.bias")):
                param.fill_(1.0)
            if name.endswith(("conv1d.weight", "conv1d_b.weight")):
                param.normal_(0, 0.5, generator=generator)
    return model


def assert_moves_logits(model: torch.nn.Module, base: torch.nn.Module, ids: torch.Tensor, floor: float,
                        what: str = "") -> None:
    """The adapted ``model`` moves ``base``'s logits on ``ids`` by more than ``floor``, in eval and train mode."""
    for train in (False, True):
        base.train(train), model.train(train)
        with torch.no_grad():
            change = (model(ids).logits - base(ids).logits).abs().max()
        assert change > floor, f"{what} (train={train}) changed the logits by {change}"


def language_assets(root, train_per_task: int = 12, test_per_task: int = 3) -> dict:
    """A briefly pre-trained tiny base (word tokenizer) and generated commonsense data under ``root``."""
    from lily_ssm.data.synthetic import write_synthetic_commonsense
    from lily_ssm.models.tiny import build_quickstart_base

    base = build_quickstart_base(root / "base", log=lambda *_: None, steps=2, corpus_size=32, hidden=32, layers=2)
    data = write_synthetic_commonsense(root / "data", train_per_task=train_per_task, test_per_task=test_per_task)
    return {"base": str(base), **data}


@pytest.fixture
def falcon():
    return tiny_mamba("falcon")


@pytest.fixture(params=["falcon", "mamba"])
def mamba_kind(request):
    return request.param

"""Tiny randomly initialised models built from configs (no hub access anywhere)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

MAMBA_TARGETS = ("in_proj", "dt_proj", "x_proj", "out_proj")


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

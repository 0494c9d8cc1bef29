"""Loading a base model and its tokenizer: a hub id, a local folder, or a built-in tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..utils.hub_access import HubError, require_hub_repo
from ..utils.paths import cache_dir, looks_like_local_path
from .mamba_ssm_checkpoint import (
    adopt_tokenizer,
    load_mamba_ssm_model,
    load_tokenizer,
    mamba_ssm_folder,
    read_mamba_ssm_config,
    transformers_config,
)

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-falcon-mamba",)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | str | None:
    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def check_model_source(name_or_path: str, what: str = "model") -> None:
    """Refuse, before anything loads, a model (or ``what``: ``tokenizer``, ...) that cannot be had: a local path
    that is missing or a file, an unknown built-in name, or a Hub id that is neither cached nor downloadable now
    (within seconds, see :func:`~lily_ssm.utils.hub_access.require_hub_repo`). A hub-id-shaped name that exists
    here is a folder."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        if name_or_path[len(BUILTIN_PREFIX):] not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {name_or_path!r}; built-in models: "
                             + ", ".join(BUILTIN_PREFIX + m for m in BUILTIN_MODELS))
        return
    path = Path(name_or_path).expanduser()
    if looks_like_local_path(name_or_path) or path.exists():
        if not path.exists():
            builtin = f" or {BUILTIN_PREFIX}{BUILTIN_MODELS[0]}" if what == "model" else ""
            raise FileNotFoundError(f"{what} folder {name_or_path} does not exist; give a local {what} folder, a Hub "
                                    f"id (org/name){builtin}")
        if not path.is_dir():
            raise NotADirectoryError(f"{what} path {name_or_path} is a file; give the folder that holds "
                                     "config.json and the weights")
        return
    require_hub_repo(name_or_path, what, "tokenizer_config.json" if what == "tokenizer" else "config.json")


def resolve_model_path(name_or_path: str, what: str = "model") -> str:
    """A hub id or folder as given, once :func:`check_model_source` accepts it; ``builtin:<name>`` becomes
    the cached folder of that model, built (and briefly pre-trained) on first use."""
    check_model_source(name_or_path, what)
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return str(Path(name_or_path).expanduser()) if looks_like_local_path(name_or_path) else name_or_path
    from .tiny import build_quickstart_base

    return str(build_quickstart_base(cache_dir() / name_or_path[len(BUILTIN_PREFIX):]))


def load_model_and_tokenizer(name_or_path: str, dtype: str | torch.dtype | None = "auto",
                             device_map: str | dict[str, Any] | None = None, tokenizer: str | None = None,
                             trust_remote_code: bool = False):
    """``(model, tokenizer)`` for a causal LM: a transformers checkpoint, or a mamba-ssm one (its equivalent
    transformers model, :mod:`.mamba_ssm_checkpoint`). The tokenizer gets a pad token (its EOS) if it has none.
    Its Mamba mixers run lily-ssm's forward (the function transformers' computes, on lily-ssm's scans and
    the CUDA kernels when present) with or without an adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..modules.registry import patch_mamba_mixers

    path = resolve_model_path(name_or_path)
    native = mamba_ssm_folder(path)
    if native is not None:
        tok = load_tokenizer(native, resolve_model_path(tokenizer, "tokenizer") if tokenizer else None)
        model = load_mamba_ssm_model(native, parse_dtype(dtype), device_map, name=path)
        adopt_tokenizer(model, tok, native)
    else:
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if dtype is not None:
            kwargs["dtype"] = parse_dtype(dtype)
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer, "tokenizer") if tokenizer else path,
                                            trust_remote_code=trust_remote_code)
    patch_mamba_mixers(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


# Architectures known without reading a config, so a 7B run can be planned with no hub access.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "tiiuae/falcon-mamba-7b": {"model_type": "falcon_mamba", "vocab_size": 65024, "hidden_size": 4096,
                               "intermediate_size": 8192, "num_hidden_layers": 64, "state_size": 16,
                               "time_step_rank": 256, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
                               "tie_word_embeddings": False},
}


def load_model_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of ``name_or_path`` without loading weights: a local folder's (a mamba-ssm
    checkpoint's as its transformers equivalent), a built-in model's, a known architecture's
    (:data:`KNOWN_CONFIGS`, no hub access), or a hub id's (cache or hub)."""
    from transformers import AutoConfig

    if name_or_path in KNOWN_CONFIGS and not Path(name_or_path).is_dir():
        return AutoConfig.for_model(**KNOWN_CONFIGS[name_or_path])
    try:
        path = resolve_model_path(name_or_path)
    except HubError as exc:
        raise HubError(f"{exc}; to plan without it: one of {', '.join(KNOWN_CONFIGS)}") from None
    native = mamba_ssm_folder(path, weights=False)
    if native is not None:
        return transformers_config(read_mamba_ssm_config(native))
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        reason = " ".join(str(exc).split())  # transformers' message spans lines; a user error is one
        raise ValueError(f"cannot read the config of {name_or_path!r} ({reason}); give a local folder with "
                         f"config.json, or one of: {', '.join(KNOWN_CONFIGS)}") from None


def meta_model(config: Any, trust_remote_code: bool = False):
    """A causal LM of ``config`` on the meta device (no weights allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def build_meta_model(name_or_path: str, trust_remote_code: bool = False):
    """The model's architecture on the meta device (no weights read or allocated): enough to plan
    adapters and count parameters, even for a 7B model on a laptop."""
    return meta_model(load_model_config(name_or_path, trust_remote_code), trust_remote_code)

"""mamba-ssm's own checkpoints (``MambaLMHeadModel`` folders) as transformers models.

A mamba-ssm folder holds a ``config.json`` with ``d_model``, ``n_layer``, ``vocab_size``, ``ssm_cfg`` (its
``layer`` is ``Mamba1`` or ``Mamba2``) and a few more keys, and the weights in ``pytorch_model.bin`` (sometimes
safetensors). lm-eval's ``mamba_ssm`` backend and the MambaPEFT code load these. Here such a folder becomes the
equivalent ``MambaForCausalLM`` / ``Mamba2ForCausalLM``: the same function, logit for logit. A setting that
transformers cannot represent (a hybrid with attention or MLP layers, LayerNorm, Mamba-2's ``D_has_hdim``, no
gated norm or a norm before the gate, ...) is refused with the key that holds it, never approximated.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..utils.safe_load import load_tensors_file

# MambaLMHeadModel's config (mamba_ssm/models/config_mamba.py) and its defaults; mamba-ssm itself rejects any
# other key, so one here means the folder is not what it claims to be.
_MODEL_DEFAULTS: dict[str, Any] = {
    "d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {}, "attn_layer_idx": [],
    "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
# Per mixer: the keys with the value transformers needs (anything else is refused), the keys mapped onto a
# transformers config field, and the keys that only steer initialisation or which kernel runs.
_FIXED = {
    "Mamba1": {},
    "Mamba2": {"D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False, "d_ssm": None,
               "process_group": None},
}
_MAPPED = {
    "Mamba1": {"d_state": ("state_size", 16), "d_conv": ("conv_kernel", 4), "expand": ("expand", 2),
               "dt_rank": ("time_step_rank", "auto"), "dt_min": ("time_step_min", 0.001),
               "dt_max": ("time_step_max", 0.1), "dt_init": ("time_step_init_scheme", "random"),
               "dt_scale": ("time_step_scale", 1.0), "dt_init_floor": ("time_step_floor", 1e-4),
               "conv_bias": ("use_conv_bias", True), "bias": ("use_bias", False)},
    "Mamba2": {"d_state": ("state_size", 128), "d_conv": ("conv_kernel", 4), "expand": ("expand", 2),
               "headdim": ("head_dim", 64), "ngroups": ("n_groups", 1), "dt_min": ("time_step_min", 0.001),
               "dt_max": ("time_step_max", 0.1), "dt_init_floor": ("time_step_floor", 1e-4),
               "dt_limit": ("time_step_limit", (0.0, math.inf)), "conv_bias": ("use_conv_bias", True),
               "bias": ("use_bias", False), "chunk_size": ("chunk_size", 256)},
}
_INERT = {
    "Mamba1": {"use_fast_path", "layer_idx"},
    "Mamba2": {"conv_init", "A_init_range", "use_mem_eff_path", "layer_idx", "sequence_parallel"},
}
# mamba-ssm builds every norm with its default epsilon: MambaLMHeadModel passes none, Mamba2's gated norm fixes it.
NORM_EPSILON = 1e-5
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# mamba-ssm's models use GPT-NeoX's tokenizer and ship none; lm-eval's mamba_ssm backend defaults to it too.
DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"


class MambaSsmCheckpointError(ValueError):
    """A mamba-ssm checkpoint folder that cannot be turned into an equivalent transformers model."""


def is_mamba_ssm_config(config: Any) -> bool:
    """Whether a parsed ``config.json`` is mamba-ssm's ``MambaLMHeadModel`` layout (no ``model_type``)."""
    return isinstance(config, dict) and "model_type" not in config and {"d_model", "n_layer"} <= config.keys()


def read_mamba_ssm_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``folder``'s ``config.json`` when it is a mamba-ssm checkpoint's, else None (no config, or another kind)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None  # transformers reports an unreadable config in its own words
    return config if is_mamba_ssm_config(config) else None


def _refuse(key: str, value: Any, why: str) -> MambaSsmCheckpointError:
    return MambaSsmCheckpointError(f"mamba-ssm checkpoint setting {key}={value!r}: {why}")


def _check_model_keys(native: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(native) - set(_MODEL_DEFAULTS))
    if unknown:
        raise _refuse(unknown[0], native[unknown[0]], "not a key of mamba-ssm's MambaConfig (known: "
                      f"{', '.join(_MODEL_DEFAULTS)}); this is not a MambaLMHeadModel checkpoint lily-ssm can read")
    cfg = {**_MODEL_DEFAULTS, **native}
    if cfg["d_intermediate"]:
        raise _refuse("d_intermediate", cfg["d_intermediate"], "MLP blocks after the mixers have no transformers "
                      "equivalent (MambaForCausalLM / Mamba2ForCausalLM need 0)")
    if cfg["attn_layer_idx"]:
        raise _refuse("attn_layer_idx", cfg["attn_layer_idx"], "attention layers have no transformers equivalent "
                      "in MambaForCausalLM / Mamba2ForCausalLM (they need [])")
    if not cfg["rms_norm"]:
        raise _refuse("rms_norm", cfg["rms_norm"], "LayerNorm blocks have no transformers equivalent (Mamba and "
                      "Mamba-2 use RMSNorm: true)")
    if not isinstance(cfg["ssm_cfg"], dict):
        raise _refuse("ssm_cfg", cfg["ssm_cfg"], "expected an object of mixer settings")
    return cfg


def _mixer_settings(ssm_cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(layer, transformers config fields)`` from mamba-ssm's ``ssm_cfg``."""
    settings = dict(ssm_cfg)
    layer = settings.pop("layer", "Mamba1")
    if layer not in _MAPPED:
        raise _refuse("ssm_cfg.layer", layer, "transformers represents Mamba1 (MambaForCausalLM) and Mamba2 "
                      "(Mamba2ForCausalLM) only")
    fields = {}
    for key, value in settings.items():
        if key in _FIXED[layer]:
            if value != _FIXED[layer][key]:
                raise _refuse(f"ssm_cfg.{key}", value, f"transformers' {layer} mixer computes only "
                              f"{key}={_FIXED[layer][key]!r}")
        elif key in _MAPPED[layer]:
            fields[_MAPPED[layer][key][0]] = value
        elif key not in _INERT[layer]:
            raise _refuse(f"ssm_cfg.{key}", value, f"not a setting of mamba-ssm's {layer} mixer (known: "
                          f"{', '.join([*_FIXED[layer], *_MAPPED[layer], *_INERT[layer]])})")
    for field, default in _MAPPED[layer].values():  # mamba-ssm's defaults, not transformers' (they differ)
        fields.setdefault(field, default)
    return layer, fields


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to ``multiple``, as MambaLMHeadModel sizes its embedding and head."""
    return vocab_size + (-vocab_size % multiple) if multiple > 1 else vocab_size


def transformers_config(native: dict[str, Any]) -> Any:
    """The ``MambaConfig`` / ``Mamba2Config`` of the same model as mamba-ssm's ``config.json`` ``native``."""
    from transformers import Mamba2Config, MambaConfig

    cfg = _check_model_keys(native)
    layer, fields = _mixer_settings(cfg["ssm_cfg"])
    d_model = cfg["d_model"]
    common = {"hidden_size": d_model, "num_hidden_layers": cfg["n_layer"], "layer_norm_epsilon": NORM_EPSILON,
              "vocab_size": padded_vocab_size(cfg["vocab_size"], cfg["pad_vocab_size_multiple"]),
              "residual_in_fp32": bool(cfg["residual_in_fp32"]), "tie_word_embeddings": bool(cfg["tie_embeddings"]),
              # GPT-NeoX's ids, the tokenizer mamba-ssm's models use; the loader resets them from the tokenizer
              "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
    expand = fields["expand"]
    if float(expand) != int(expand):
        raise _refuse("ssm_cfg.expand", expand, "transformers needs a whole number (its config rounds the inner "
                      "width from it)")
    fields["expand"] = int(expand)
    if layer == "Mamba1":
        if fields["time_step_rank"] != "auto":
            fields["time_step_rank"] = int(fields["time_step_rank"])
        return MambaConfig(**common, **fields)
    d_inner = fields["expand"] * d_model
    if d_inner % fields["head_dim"]:
        raise _refuse("ssm_cfg.headdim", fields["head_dim"], f"must divide the inner width {d_inner}")
    heads = d_inner // fields["head_dim"]
    if heads % fields["n_groups"]:
        raise _refuse("ssm_cfg.ngroups", fields["n_groups"], f"must divide the number of heads {heads}")
    fields["time_step_limit"] = tuple(float(x) for x in fields["time_step_limit"])
    return Mamba2Config(**common, **fields, num_heads=heads)


def read_native_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a mamba-ssm checkpoint folder: ``model.safetensors`` (or its shards), else
    ``pytorch_model.bin`` read with ``weights_only=True`` (never unpickled as arbitrary objects)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    if (folder / "pytorch_model.bin").is_file():
        state = load_tensors_file(folder / "pytorch_model.bin", "mamba-ssm weights")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise MambaSsmCheckpointError(f"{folder / 'pytorch_model.bin'} is not a state dict of tensors")
        return state
    raise MambaSsmCheckpointError(f"mamba-ssm checkpoint {folder} holds none of {', '.join(WEIGHT_FILES)}")


def _transformers_key(key: str) -> str:
    # MambaLMHeadModel and transformers' *ForCausalLM share every name below the backbone but its embedding's.
    return "backbone.embeddings.weight" if key == "backbone.embedding.weight" else key


def convert_state_dict(native: dict[str, torch.Tensor], model: torch.nn.Module,
                       where: str | os.PathLike) -> dict[str, torch.Tensor]:
    """mamba-ssm's state dict ``native`` renamed for the transformers ``model`` built from its config; every key
    and shape must match (a missing, extra or misshapen tensor is refused with its name). A tied head may be
    absent (safetensors stores a shared tensor once)."""
    expected = model.state_dict()
    converted = {_transformers_key(k): v for k, v in native.items()}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" not in converted and "backbone.embeddings.weight" in converted:
        converted["lm_head.weight"] = converted["backbone.embeddings.weight"]
    for key, tensor in native.items():
        name = _transformers_key(key)
        if name not in expected:
            raise MambaSsmCheckpointError(f"mamba-ssm checkpoint {where} holds {key}, which the model its config "
                                          "describes has no place for (a different architecture?)")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise MambaSsmCheckpointError(f"mamba-ssm checkpoint {where}: {key} has shape {tuple(tensor.shape)}, its "
                                          f"config.json implies {tuple(expected[name].shape)}")
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise MambaSsmCheckpointError(f"mamba-ssm checkpoint {where} lacks {missing[0]}"
                                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if tied and not torch.equal(converted["lm_head.weight"], converted["backbone.embeddings.weight"]):
        raise _refuse("tie_embeddings", True, "but lm_head.weight differs from the embedding in the weights")
    return converted


def load_mamba_ssm_model(folder: str | os.PathLike, dtype: torch.dtype | str | None = "auto",
                         device_map: str | dict[str, Any] | None = None, name: str | None = None) -> Any:
    """The transformers causal LM equivalent to the mamba-ssm checkpoint in ``folder``; ``dtype`` as
    ``from_pretrained`` takes it (``auto``: the weights' own), ``name`` the base's name to record (default the
    folder)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    native = read_mamba_ssm_config(folder)
    if native is None:
        raise MambaSsmCheckpointError(f"{folder} holds no mamba-ssm config.json (d_model, n_layer, no model_type)")
    config = transformers_config(native)
    state = read_native_state_dict(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    state = convert_state_dict(state, skeleton, folder)
    config.dtype = state["backbone.embeddings.weight"].dtype
    if dtype == "auto" or dtype is None:
        dtype = config.dtype
    config._name_or_path = name or str(folder)
    model = type(skeleton).from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                           device_map=device_map)
    model.config._name_or_path = name or str(folder)
    return model.eval()


def tokenizer_source(folder: Path, tokenizer: str | None) -> str:
    """Where a mamba-ssm checkpoint's tokenizer comes from: ``tokenizer`` when given, the folder when it has one,
    else GPT-NeoX's (mamba-ssm's models use it and ship none; a note says so)."""
    if tokenizer:
        return tokenizer
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return str(folder)
    print(f"note: {folder} ships no tokenizer; using {DEFAULT_TOKENIZER}, the one mamba-ssm's models use (pass a "
          "tokenizer for another)", file=sys.stderr)
    return DEFAULT_TOKENIZER


def load_tokenizer(folder: Path, tokenizer: str | None, **kwargs: Any) -> Any:
    """The tokenizer of the mamba-ssm checkpoint in ``folder`` (:func:`tokenizer_source`); a failure to load it
    is one line that says to pass one."""
    from transformers import AutoTokenizer

    source = tokenizer_source(folder, tokenizer)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise MambaSsmCheckpointError(f"cannot load the tokenizer {source} for the mamba-ssm checkpoint {folder} "
                                      f"({reason}); pass a local tokenizer folder (tokenizer=...)") from None


def adopt_tokenizer(model: Any, tokenizer: Any, folder: Path) -> None:
    """Check that ``tokenizer`` fits the vocabulary of ``model`` (built from the mamba-ssm checkpoint in
    ``folder``) and give the model its special token ids (the config has none of its own)."""
    if len(tokenizer) > model.config.vocab_size:
        raise MambaSsmCheckpointError(f"the tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens, more "
                                      f"than the mamba-ssm checkpoint {folder} has rows ({model.config.vocab_size})")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name)
        if value is not None:
            setattr(model.config, name, value)
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, name, value)


def mamba_ssm_folder(name_or_path: str, weights: bool = True) -> Path | None:
    """The local folder of the mamba-ssm checkpoint ``name_or_path`` names (a folder here, or a Hub repository
    in mamba-ssm's layout, e.g. ``state-spaces/mamba-130m``, through its snapshot; with ``weights`` False only its
    config.json is fetched), or None when it names anything else (transformers then loads it, or says why not)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path if read_mamba_ssm_config(path) is not None else None
    if path.exists() or name_or_path.count("/") != 1:
        return None
    return _hub_snapshot(name_or_path, weights)


def _hub_snapshot(repo_id: str, weights: bool) -> Path | None:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        config = Path(hf_hub_download(repo_id, "config.json"))
    except Exception:  # not a repository, offline, gated, ...: transformers says which, in its own words
        return None
    if read_mamba_ssm_config(config.parent) is None:
        return None
    if not weights:
        return config.parent
    folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    if not any((folder / name).is_file() for name in WEIGHT_FILES[:2]):
        hf_hub_download(repo_id, "pytorch_model.bin")  # lands in the same snapshot folder
    return folder

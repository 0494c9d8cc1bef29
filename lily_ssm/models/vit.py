"""transformers' ViT as a VTAB-1K backbone (the paper's ViT-B/16 comparison, docs/design.md §5).

A backbone is a ``ViTForImageClassification``: from an HF-format checkpoint (a local folder or a hub id,
e.g. ``google/vit-base-patch16-224-in21k``; transformers 5 converts the older ``encoder.layer.N.attention
.attention.query`` layout on load) or, without one, built from a preset (random init: ViT-B/16 for
counting and planning, a tiny one for tests). Its classifier is replaced by a fresh ``nn.Linear`` sized
to the task, PyTorch's default init, as the published code's ``reset_classifier`` makes it.

The input settings come from the checkpoint: the image size from its config (its position embeddings
are built for it), mean and std from its ``preprocessor_config.json``; without that file, transformers'
``ViTImageProcessor`` defaults (0.5 / 0.5, the normalisation Google's ViT checkpoints were trained with).

Not reproduced from the published timm model: its frozen pre-logits layer (tanh dense before the head,
HF's unused ``pooler``) and stochastic depth 0.1; HF's ViT classifies ``layernorm(CLS)`` directly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..utils.compat import reads_legacy_vit_checkpoints
from .loading import check_model_source

HEAD_NAME = "classifier"  # ViTForImageClassification's head: trained and saved with the adapter

VIT_PRESETS: dict[str, dict[str, Any]] = {
    # ViT-B/16 (Dosovitskiy et al., 2020), as google/vit-base-patch16-224-in21k's config.json.
    "vit_base_patch16_224": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                                 num_attention_heads=12, intermediate_size=3072),
    # A few-thousand-parameter ViT for tests and CPU demos.
    "vit_tiny_test": dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=64),
}


class ViTCheckpointError(ValueError):
    """A checkpoint that is not a ViT, or whose weights do not cover the ViT backbone."""


@dataclass(frozen=True)
class ImageSettings:
    """How images are fed to a backbone: square ``size`` and per-channel ``mean`` / ``std``, and where the
    normalisation came from (for the log)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


def _vit_classes():
    from transformers import AutoConfig, ViTConfig, ViTForImageClassification

    return AutoConfig, ViTConfig, ViTForImageClassification


def build_vit(num_classes: int, checkpoint: str | None = None, preset: str = "vit_base_patch16_224",
              img_size: int | None = None, overrides: dict[str, Any] | None = None,
              weights: bool = True) -> nn.Module:
    """A ``ViTForImageClassification`` with a fresh ``num_classes``-way head.

    With ``checkpoint`` (a folder or hub id holding an HF ViT) its weights are loaded (only its config with
    ``weights=False``, for planning on the meta device); a backbone weight missing from it raises
    :class:`ViTCheckpointError`. Without one, ``preset`` (:data:`VIT_PRESETS`) gives the config. ``img_size``
    sets a preset's image size; for a checkpoint it must be unset or equal to the checkpoint's. ``overrides``
    are ViTConfig fields set over either.
    """
    AutoConfig, ViTConfig, ViTForImageClassification = _vit_classes()
    overrides = dict(overrides or {})
    if checkpoint is None:
        if preset not in VIT_PRESETS:
            raise ValueError(f"ViT preset {preset!r}; presets: {', '.join(VIT_PRESETS)}")
        values = {**VIT_PRESETS[preset], **({"image_size": img_size} if img_size is not None else {}), **overrides}
        model = ViTForImageClassification(ViTConfig(**values, num_labels=num_classes))
        return replace_head(model, num_classes)
    check_model_source(checkpoint, "ViT checkpoint")  # a Hub id offline fails now, in seconds
    kind = AutoConfig.from_pretrained(checkpoint).model_type
    if kind != "vit":
        raise ViTCheckpointError(f"checkpoint {checkpoint} holds a {kind!r} model; model.kind: vit takes transformers "
                                 "ViT checkpoints (model_type 'vit')")
    config = ViTConfig.from_pretrained(checkpoint, num_labels=num_classes, **overrides)
    if img_size is not None and img_size != config.image_size:
        raise ValueError(f"model.img_size={img_size}, but {checkpoint} is a ViT for {config.image_size} px images (its "
                         "position embeddings fix the size); leave model.img_size unset for a ViT checkpoint")
    if not weights:
        return replace_head(ViTForImageClassification(config), num_classes)
    model, info = ViTForImageClassification.from_pretrained(checkpoint, config=config, dtype=torch.float32,
                                                            ignore_mismatched_sizes=True, output_loading_info=True)
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(f"{HEAD_NAME}."))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        if not reads_legacy_vit_checkpoints() and any(".attention.attention." in k for k in info["unexpected_keys"]):
            import transformers

            raise ViTCheckpointError(f"checkpoint {checkpoint} uses the hub's ViT key layout (encoder.layer.N."
                                     f"attention.attention.query, ...), which transformers {transformers.__version__} "
                                     "cannot read; transformers 5.18 and later convert it (pip install -U "
                                     "'transformers>=5.18')")
        raise ViTCheckpointError(f"checkpoint {checkpoint} lacks ViT backbone weights ({shown}); it is not a complete "
                                 "ViT checkpoint")
    return replace_head(model, num_classes)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a new ``num_classes``-way classifier (PyTorch's default ``nn.Linear`` init)."""
    config = model.config
    head = nn.Linear(config.hidden_size, num_classes)
    model.classifier = head.to(device=model.vit.layernorm.weight.device, dtype=model.vit.layernorm.weight.dtype)
    model.num_labels = config.num_labels = num_classes
    return model


def _preprocessor_config(checkpoint: str) -> dict[str, Any] | None:
    from transformers.utils import cached_file

    path = cached_file(checkpoint, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _three(value: Any, name: str, where: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else value
    if not (isinstance(values, Sequence) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)):
        raise ValueError(f"{where}: {name}={value!r}; expected three numbers (R, G, B)")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def vit_image_settings(model: nn.Module, checkpoint: str | None, mean: Any = None, std: Any = None) -> ImageSettings:
    """The image size of ``model``'s config and the normalisation to feed it with: ``mean`` / ``std`` when
    given, else the checkpoint's ``preprocessor_config.json`` (``do_normalize: false`` meaning none), else
    transformers' ``ViTImageProcessor`` defaults (0.5 / 0.5)."""
    from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

    size = model.config.image_size
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise ValueError(f"the ViT's image_size is {size}; VTAB images are square")
        size = int(size[0])
    if (mean is None) != (std is None):
        raise ValueError(f"model.mean={mean!r}, model.std={std!r}: give both or neither")
    if mean is not None:
        return ImageSettings(size, _three(mean, "mean", "model"), _three(std, "std", "model"), "model.mean / model.std")
    processor = _preprocessor_config(checkpoint) if checkpoint else None
    if processor is not None:
        where = f"{checkpoint}/preprocessor_config.json"
        if processor.get("do_normalize", True) is False:
            return ImageSettings(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), f"{where} (do_normalize: false)")
        if "image_mean" in processor or "image_std" in processor:
            return ImageSettings(size, _three(processor.get("image_mean"), "image_mean", where),
                                 _three(processor.get("image_std"), "image_std", where), where)
    source = "ViTImageProcessor defaults" + (f" ({checkpoint} has no preprocessor_config.json)" if checkpoint else "")
    return ImageSettings(size, _three(IMAGENET_STANDARD_MEAN, "mean", source), _three(IMAGENET_STANDARD_STD, "std",
                                                                                      source), source)


__all__ = ["HEAD_NAME", "ImageSettings", "VIT_PRESETS", "ViTCheckpointError", "build_vit", "replace_head",
           "vit_image_settings"]

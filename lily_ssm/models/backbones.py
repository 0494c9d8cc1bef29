"""The image backbones a VTAB run adapts: lily-ssm's Vision Mamba or a transformers ViT, with a fresh head.

:data:`BACKBONES` names each kind's presets, default preset and classifier head (the module trained and
saved with the adapter); :func:`build_backbone` builds one, :func:`image_settings` says how to feed it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..data.vtab import IMAGENET_MEAN, IMAGENET_STD
from .vim import VIM_PRESETS, VimConfig, VimGeometry, VisionMamba, load_vim_checkpoint
from .vit import VIT_PRESETS, ImageSettings, build_vit, vit_image_settings

BACKBONES: dict[str, dict[str, Any]] = {
    # kind -> its presets, default preset, classifier head (a module trained and saved with the adapter)
    "vim": {"presets": VIM_PRESETS, "preset": "vim_small", "head": "head"},
    "vit": {"presets": VIT_PRESETS, "preset": "vit_base_patch16_224", "head": "classifier"},
}


def build_backbone(kind: str, preset: str, num_classes: int, checkpoint: str | None = None,
                   img_size: int | None = None, overrides: dict[str, Any] | None = None,
                   weights: bool = True) -> nn.Module:
    """A ``kind`` backbone (from its ``checkpoint`` when given) with a fresh ``num_classes`` head.

    Vim: a checkpoint's geometry is read off its tensors; ``img_size`` and ``overrides["stride"]`` (and
    ``patch_size``) are tried first, so a non-standard checkpoint loads when they are set.
    ViT: a ``ViTForImageClassification`` (:func:`lily_ssm.models.vit.build_vit`); ``weights=False`` reads
    only its checkpoint's config (for planning)."""
    overrides = overrides or {}
    if kind == "vit":
        return build_vit(num_classes, checkpoint, preset, img_size, overrides, weights=weights)
    if kind != "vim":
        raise ValueError(f"backbone kind {kind!r}; kinds: {', '.join(BACKBONES)}")
    if checkpoint:
        config = VIM_PRESETS[preset](img_size=img_size, **overrides)
        preferred = VimGeometry(config.img_size, config.patch_size, config.stride)
        model = load_vim_checkpoint(checkpoint, preferred=preferred)
        model.head = nn.Linear(model.config.embed_dim, num_classes)
        model.config = VimConfig(**{**model.config.to_dict(), "num_classes": num_classes})
        return model
    return VisionMamba(VIM_PRESETS[preset](img_size=img_size, num_classes=num_classes, **overrides))


def image_settings(kind: str, model: nn.Module, checkpoint: str | None = None, mean: Any = None,
                   std: Any = None) -> ImageSettings:
    """The image size and normalisation ``model`` (a ``kind`` backbone) is fed with: ``mean`` / ``std`` when
    given, else a ViT checkpoint's preprocessor settings, else ImageNet's."""
    if kind == "vit":
        return vit_image_settings(model, checkpoint, mean, std)
    if mean is not None:
        return ImageSettings(model.config.img_size, tuple(mean), tuple(std), "model.mean / model.std")
    return ImageSettings(model.config.img_size, IMAGENET_MEAN, IMAGENET_STD, "ImageNet")


def logits_of(output: Any) -> Any:
    """The class scores of a backbone's output (Vim returns them; transformers wraps them in ``.logits``)."""
    return output.logits if hasattr(output, "logits") else output

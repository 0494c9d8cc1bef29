"""Model building blocks owned by this toolkit."""

from .mamba_mixer import mamba_mixer_forward, patch_mamba_mixers, unpatch_mamba_mixers

__all__ = ["mamba_mixer_forward", "patch_mamba_mixers", "unpatch_mamba_mixers"]

"""Model building blocks owned by this toolkit: the module-calling Mamba-1 and Mamba-2 mixer forwards, the
recomputed SSM core, and what a mixer asks of its projections."""

from .registry import MAMBA1_MIXERS, MAMBA2_MIXERS, owned_forward, patch_mamba_mixers, unpatch_mamba_mixers

__all__ = ["MAMBA1_MIXERS", "MAMBA2_MIXERS", "owned_forward", "patch_mamba_mixers", "unpatch_mamba_mixers"]

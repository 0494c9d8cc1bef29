"""Vision Mamba (Vim) with the bidirectional "v2" mixer (DESIGN.md §4).

The architecture and state-dict layout follow the public Vim checkpoints (e.g.
``vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``)::

    patch_embed.proj.{weight,bias}   cls_token   pos_embed   norm_f.weight   head.{weight,bias}
    layers.N.norm.weight
    layers.N.mixer.{in_proj,conv1d,conv1d_b,x_proj,x_proj_b,dt_proj,dt_proj_b,out_proj}.*
    layers.N.mixer.{A_log,A_b_log,D,D_b}

Like the language-model mixer (:mod:`lily_ssm.modules.mamba_mixer`), :class:`VimMixer` calls every
projection through its module, so adapters on ``in_proj``, ``x_proj(_b)``, ``dt_proj(_b)`` and
``out_proj`` run; Δ is taken with :func:`~lily_ssm.tuners.base.linear_without_bias` and handed to the
scan together with ``delta_bias``; the scan and the convolution go through :mod:`lily_ssm.ops`
(CUDA kernels when present, PyTorch otherwise).

Blocks are written as a plain pre-norm residual, ``x = x + mixer(norm(x))``, followed by
``norm_f(x)``. Vim's fused "add + norm" blocks (``residual = residual + hidden; hidden =
mixer(norm(residual))``, ``norm_f(residual + hidden)``) compute the same function; the only
differences are numerical (Vim keeps the residual stream in fp32 when ``residual_in_fp32``) and
Vim's stochastic depth (drop path), which is not implemented here.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import ops
from ..tuners.base import linear_without_bias


class VimCheckpointError(ValueError):
    """A Vim checkpoint does not match the architecture (missing/unexpected keys, wrong shapes)."""


@dataclass
class VimConfig:
    """Hyper-parameters of a Vision Mamba; ``dt_rank="auto"`` resolves to ``ceil(embed_dim / 16)``."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    num_classes: int = 1000
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.embed_dim / 16)
        if not isinstance(self.dt_rank, int) or self.dt_rank <= 0:
            raise ValueError(f"dt_rank must be a positive int or 'auto', got {self.dt_rank!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def vim_tiny(**overrides: Any) -> VimConfig:
    """Vim-Ti: embed 192, depth 24 (d_inner 384, dt_rank 12)."""
    return VimConfig(**{"embed_dim": 192, "depth": 24, **overrides})


def vim_small(**overrides: Any) -> VimConfig:
    """Vim-S: embed 384, depth 24 (d_inner 768, dt_rank 24)."""
    return VimConfig(**{"embed_dim": 384, "depth": 24, **overrides})


def vim_base(**overrides: Any) -> VimConfig:
    """Vim-B: embed 768, depth 24 (d_inner 1536, dt_rank 48)."""
    return VimConfig(**{"embed_dim": 768, "depth": 24, **overrides})


VIM_PRESETS = {"vim_tiny": vim_tiny, "vim_small": vim_small, "vim_base": vim_base}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        out = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


def _init_dt_proj(dt_proj: nn.Linear, dt_rank: int, dt_min: float = 1e-3, dt_max: float = 0.1,
                  dt_init_floor: float = 1e-4) -> None:
    """Mamba's initialisation: random weight of std ``dt_rank**-0.5``, bias = softplus⁻¹(dt ~ logU)."""
    with torch.no_grad():
        std = dt_rank ** -0.5
        dt_proj.weight.uniform_(-std, std)
        dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class VimMixer(nn.Module):
    """Bidirectional "v2" Mamba mixer with the output divided by 2 (``bimambav2 ... div2``)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int = 0) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        d_inner = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1).contiguous()
        # forward direction
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(A_log.clone())
        self.D = nn.Parameter(torch.ones(d_inner))
        # backward direction
        self.conv1d_b = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj_b = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_b_log = nn.Parameter(A_log.clone())
        self.D_b = nn.Parameter(torch.ones(d_inner))

        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        _init_dt_proj(self.dt_proj, self.dt_rank)
        _init_dt_proj(self.dt_proj_b, self.dt_rank)

    def _direction(self, x: torch.Tensor, z: torch.Tensor, conv1d: nn.Conv1d, x_proj: nn.Module,
                   dt_proj: nn.Module, A_log: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """One causal Mamba pass over ``x, z (batch, d_inner, seqlen)``; returns ``(batch, d_inner, seqlen)``."""
        x = ops.causal_conv1d(x, conv1d.weight.squeeze(1), conv1d.bias, activation="silu")
        time_step, B, C = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta, delta_bias = linear_without_bias(dt_proj, time_step)  # adapted Δ, bias kept apart
        A = -torch.exp(A_log.float())
        return ops.selective_scan(
            x, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D.float(), z=z,
            delta_bias=delta_bias.float() if delta_bias is not None else None, delta_softplus=True,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states (batch, seqlen, d_model)`` -> ``(batch, seqlen, d_model)``."""
        dtype = hidden_states.dtype
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, t) each
        y_f = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y_b = self._direction(x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b,
                              self.A_b_log, self.D_b).flip(-1)
        y = (y_f.float() + y_b.float()) / 2
        return self.out_proj(y.transpose(1, 2).to(dtype))


class VimBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.mixer = VimMixer(config.embed_dim, config.d_state, config.d_conv, config.expand, config.dt_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        self.img_size = config.img_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(pixel_values.shape[-2:])}")
        return self.proj(pixel_values).flatten(2).transpose(1, 2)  # (b, num_patches, embed_dim)


class VisionMamba(nn.Module):
    """Vim classifier: patches + middle cls token + absolute positions -> bidirectional Mamba blocks.

    The logits come from the final-normed cls token, which sits at position ``num_patches // 2``.
    """

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.embed_dim))
        self.layers = nn.ModuleList(VimBlock(config) for _ in range(config.depth))
        self.norm_f = RMSNorm(config.embed_dim, config.norm_eps)
        self.head = nn.Linear(config.embed_dim, config.num_classes) if config.num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def token_position(self) -> int:
        return self.config.num_patches // 2

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The final-normed cls-token feature, ``(batch, embed_dim)``."""
        x = self.patch_embed(pixel_values)
        mid = self.token_position
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([x[:, :mid], cls, x[:, mid:]], dim=1) + self.pos_embed.to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.norm_f(x)[:, mid]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(pixel_values))


# ----------------------------------------------------------------------------------------------
# Loading the public checkpoints

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")


def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state = obj["model"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj  # a bare state dict
    else:
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise VimCheckpointError(f"{path}: expected a Vim checkpoint {{'model': state_dict}}, found {keys}")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def infer_vim_config(state_dict: dict[str, torch.Tensor], path: str = "<state dict>") -> VimConfig:
    """Read a :class:`VimConfig` off the tensor shapes of a Vim state dict."""
    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise VimCheckpointError(f"{path}: cannot infer the Vim config, missing key {key!r}")
        return state_dict[key]

    patch = need("patch_embed.proj.weight")  # (embed, in_chans, p, p)
    embed_dim, in_chans, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    num_patches = need("pos_embed").shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches or patch.shape[2] != patch.shape[3]:
        raise VimCheckpointError(f"{path}: only square images/patches are supported "
                                 f"(pos_embed has {num_patches} patch positions, patch {tuple(patch.shape[2:])})")
    layers = {int(m.group(1)) for k in state_dict if (m := _LAYER_KEY.match(k))}
    depth = max(layers) + 1 if layers else 0
    A_log = need("layers.0.mixer.A_log")  # (d_inner, d_state)
    d_inner, d_state = A_log.shape
    if d_inner % embed_dim:
        raise VimCheckpointError(f"{path}: d_inner={d_inner} is not a multiple of embed_dim={embed_dim}")
    head = state_dict.get("head.weight")
    return VimConfig(
        img_size=grid * patch_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
        d_state=d_state, d_conv=need("layers.0.mixer.conv1d.weight").shape[-1], expand=d_inner // embed_dim,
        dt_rank=need("layers.0.mixer.dt_proj.weight").shape[1], num_classes=head.shape[0] if head is not None else 0,
    )


def check_vim_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str = "<state dict>") -> None:
    """Raise :class:`VimCheckpointError` naming every missing/unexpected key and mismatched shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {expected[k]}"
                        for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k])
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"mismatched shapes ({len(mismatched)}): {'; '.join(mismatched)}")
        config = getattr(model, "config", None)
        where = f" for {config}" if config is not None else ""
        raise VimCheckpointError(f"{path} does not match the Vision Mamba{where}:\n  " + "\n  ".join(parts))


def load_vim_checkpoint(path: str | Path, config: VimConfig | None = None, *,
                        map_location: str | torch.device = "cpu") -> VisionMamba:
    """Build a :class:`VisionMamba` from a public Vim ``.pth`` file (``{"model": state_dict}``).

    Without ``config`` the architecture is inferred from the tensor shapes; with one, it is checked
    against them. Keys and shapes are checked strictly (:class:`VimCheckpointError` names every
    missing/unexpected key and mismatched shape, and the file).
    """
    path = str(path)
    obj = torch.load(path, map_location=map_location, weights_only=True)
    state_dict = _extract_state_dict(obj, path)
    if config is None:
        config = infer_vim_config(state_dict, path)
    else:
        config = replace(config)  # do not share a mutable config with the caller
    model = VisionMamba(config)
    check_vim_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return model


__all__ = [
    "RMSNorm", "VIM_PRESETS", "VimBlock", "VimCheckpointError", "VimConfig", "VimMixer", "VisionMamba",
    "check_vim_state_dict", "infer_vim_config", "load_vim_checkpoint", "vim_base", "vim_small", "vim_tiny",
]


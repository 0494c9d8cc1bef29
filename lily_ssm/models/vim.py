"""Vision Mamba (Vim) with the bidirectional "v2" mixer (docs/design.md §3, §5).

The architecture and state-dict layout follow the public Vim checkpoints (e.g.
``vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``)::

    patch_embed.proj.{weight,bias}   cls_token   pos_embed   norm_f.weight   head.{weight,bias}
    layers.N.norm.weight
    layers.N.mixer.{in_proj,conv1d,conv1d_b,x_proj,x_proj_b,dt_proj,dt_proj_b,out_proj}.*
    layers.N.mixer.{A_log,A_b_log,D,D_b}

Like the language-model mixer (:mod:`lily_ssm.modules.mamba_mixer`), :class:`VimMixer` calls every
projection through its module, so adapters on ``in_proj``, ``x_proj(_b)``, ``dt_proj(_b)`` and
``out_proj`` run; Δ is taken with :func:`~lily_ssm.modules.projection.linear_without_bias` and handed to the
scan together with ``delta_bias``; the scan and the convolution go through :mod:`lily_ssm.ops`
(CUDA kernels when present, PyTorch otherwise).

Patches come from a ``patch_size`` convolution with ``stride`` (default ``patch_size``): the "+"
checkpoints (Vim-Ti+/S+, ``*_patch16_stride8_224_*``) use stride 8, giving 27x27 = 729 patches at
224 px. :func:`load_vim_checkpoint` infers ``(img_size, patch_size, stride)`` from ``pos_embed`` and
the patch kernel.

Blocks are written as a pre-norm residual, ``residual = residual + mixer(norm(residual))``, followed by
``norm_f(residual)``. Vim's fused "add + norm" blocks (``residual = residual + hidden; hidden =
mixer(norm(residual))``, ``norm_f(residual + hidden)``) compute the same function. As in Vim
(``residual_in_fp32=True``), the residual stream is fp32 whatever the compute dtype (a bf16 model or
autocast): the additions accumulate in fp32, each norm reads the fp32 residual and hands the mixer
its output in the compute dtype (the patch embedding's dtype), and ``norm_f``'s output is cast to it
too before the head. One small difference: the patch embedding, cls token and ``pos_embed`` are summed
in fp32 here (Vim sums them in the model's dtype). Vim's stochastic depth (drop path) is not
implemented.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import ops
from ..modules.projection import linear_without_bias, read_parameters
from ..modules.recompute import fused_enabled, fused_scan
from ..utils.safe_load import load_tensors_file


class VimCheckpointError(ValueError):
    """A Vim checkpoint does not match the architecture (missing/unexpected keys, wrong shapes)."""


@dataclass
class VimConfig:
    """Hyper-parameters of a Vision Mamba.

    ``dt_rank="auto"`` resolves to ``ceil(embed_dim / 16)`` and ``stride=None`` to ``patch_size``; the
    patch grid is ``(img_size - patch_size) // stride + 1`` per side (Vim's ``PatchEmbed``).
    """

    img_size: int = 224
    patch_size: int = 16
    stride: int | None = None  # of the patch convolution; None means patch_size (no overlap)
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
        if self.stride is None:
            self.stride = self.patch_size
        for name in ("img_size", "patch_size", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.img_size < self.patch_size or (self.img_size - self.patch_size) % self.stride:
            raise ValueError(f"img_size={self.img_size}, patch_size={self.patch_size}, stride={self.stride}: "
                             f"img_size - patch_size must be a non-negative multiple of stride "
                             f"(e.g. img_size={_fit_img_size(self.img_size, self.patch_size, self.stride)})")

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def grid_size(self) -> int:
        """Patches per side, ``(img_size - patch_size) // stride + 1``."""
        return _grid_size(self.img_size, self.patch_size, self.stride)

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _grid_size(img_size: int, patch_size: int, stride: int) -> int:
    return (img_size - patch_size) // stride + 1


def _fit_img_size(img_size: int, patch_size: int, stride: int) -> int:
    """The nearest image size at or above ``patch_size`` that the patch grid covers exactly."""
    steps = max(0, round((img_size - patch_size) / stride))
    return patch_size + steps * stride


def vim_tiny(**overrides: Any) -> VimConfig:
    """Vim-Ti: embed 192, depth 24 (d_inner 384, dt_rank 12); Vim-Ti+ is ``vim_tiny(stride=8)``."""
    return VimConfig(**{"embed_dim": 192, "depth": 24, **overrides})


def vim_small(**overrides: Any) -> VimConfig:
    """Vim-S: embed 384, depth 24 (d_inner 768, dt_rank 24); Vim-S+ is ``vim_small(stride=8)``."""
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

    def _scan_inputs(self, x: torch.Tensor, z: torch.Tensor, conv1d: nn.Conv1d, x_proj: nn.Module,
                     dt_proj: nn.Module, A_log: torch.Tensor, D: torch.Tensor, flip: bool) -> tuple[Any, ...]:
        """One direction's scan inputs from ``x, z (batch, d_inner, seqlen)``, through the modules (the backward
        direction reads the flipped sequence)."""
        if flip:
            x, z = x.flip(-1), z.flip(-1)
        x = ops.causal_conv1d(x, conv1d.weight.squeeze(1), conv1d.bias, activation="silu")
        time_step, B, C = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta, delta_bias = linear_without_bias(dt_proj, time_step)  # adapted Δ, bias kept apart
        return (x, delta.transpose(1, 2), -torch.exp(A_log.float()), B.transpose(1, 2), C.transpose(1, 2), D.float(),
                z, delta_bias.float() if delta_bias is not None else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states (batch, seqlen, d_model)`` -> ``(batch, seqlen, d_model)``.

        With gradients on, each direction's scan runs once and keeps only the in_proj output and the scan's
        own state for backward; the rest is recomputed there (:func:`lily_ssm.modules.recompute.fused_scan`)."""
        dtype = hidden_states.dtype
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, t) each
        directions = ((False, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D),
                      (True, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b))
        ys = []
        for flip, conv1d, x_proj, dt_proj, A_log, D in directions:
            def scan_inputs(x, z, flip=flip, conv1d=conv1d, x_proj=x_proj, dt_proj=dt_proj, A_log=A_log, D=D):
                return self._scan_inputs(x, z, conv1d, x_proj, dt_proj, A_log, D, flip)

            if fused_enabled():
                y = fused_scan(scan_inputs, (x, z), read_parameters((conv1d, x_proj, dt_proj), (A_log, D)))
            else:
                y = ops.selective_scan(*scan_inputs(x, z), delta_softplus=True)
            ys.append(y.flip(-1) if flip else y)
        y = (ys[0].float() + ys[1].float()) / 2
        return self.out_proj(y.transpose(1, 2).to(dtype))


class VimBlock(nn.Module):
    """Pre-norm residual block with an fp32 residual: ``residual + mixer(norm(residual))``."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.mixer = VimMixer(config.embed_dim, config.d_state, config.d_conv, config.expand, config.dt_rank)

    def forward(self, residual: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``residual (batch, seqlen, d_model)`` -> the next residual, always fp32.

        The mixer gets ``norm(residual)`` in ``dtype`` (default: ``residual``'s dtype); its output is
        added in fp32, as Vim's fused add + norm does with ``residual_in_fp32``.
        """
        dtype = dtype or residual.dtype
        residual = residual.float()
        return residual + self.mixer(self.norm(residual).to(dtype)).float()


class PatchEmbed(nn.Module):
    """``patch_size`` convolution with ``stride``: ``(batch, chans, img, img) -> (batch, grid**2, embed_dim)``."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        self.img_size = config.img_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, stride=config.stride)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(pixel_values.shape[-2:])}")
        return self.proj(pixel_values).flatten(2).transpose(1, 2)  # (b, num_patches, embed_dim)


class VisionMamba(nn.Module):
    """Vim classifier: patches + middle cls token + absolute positions -> bidirectional Mamba blocks.

    The logits come from the final-normed cls token, which sits at position ``num_patches // 2``
    (Vim's ``token_position = M // 2``; 364 for the 729 patches of a stride-8 model). The residual
    stream is fp32; the mixers, the final feature and the head run in the patch embedding's dtype.
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
        """Index of the middle cls token in the sequence of ``num_patches + 1`` tokens."""
        return self.config.num_patches // 2

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The final-normed cls-token feature, ``(batch, embed_dim)``, in the patch embedding's dtype."""
        x = self.patch_embed(pixel_values)
        dtype, mid = x.dtype, self.token_position
        x = x.float()
        cls = self.cls_token.float().expand(x.shape[0], -1, -1)
        residual = torch.cat([x[:, :mid], cls, x[:, mid:]], dim=1) + self.pos_embed.float()
        for layer in self.layers:
            residual = layer(residual, dtype)
        return self.norm_f(residual)[:, mid].to(dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(pixel_values))


# ----------------------------------------------------------------------------------------------
# Loading the public checkpoints

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")
STANDARD_IMG_SIZE = 224  # every public Vim checkpoint (Vim-Ti/S/B and the stride-8 Ti+/S+) is 224 px


class VimGeometry(NamedTuple):
    """Image size, patch (kernel) size and stride of the patch convolution."""

    img_size: int
    patch_size: int
    stride: int

    @property
    def grid_size(self) -> int:
        return _grid_size(*self)

    def describe(self) -> str:
        return f"(img_size={self.img_size}, patch_size={self.patch_size}, stride={self.stride}) -> " \
               f"{self.grid_size}x{self.grid_size}"


def standard_vim_geometries(patch_size: int) -> list[VimGeometry]:
    """The public checkpoints' layouts for a ``patch_size`` kernel: 224 px with stride ``p`` or ``p / 2``."""
    strides = [patch_size] + ([patch_size // 2] if patch_size % 2 == 0 else [])
    img = STANDARD_IMG_SIZE
    return [VimGeometry(img, patch_size, s) for s in strides if img >= patch_size and (img - patch_size) % s == 0]


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


def _need(state_dict: dict[str, torch.Tensor], key: str, path: str) -> torch.Tensor:
    if key not in state_dict:
        raise VimCheckpointError(f"{path}: cannot infer the Vim config, missing key {key!r}")
    return state_dict[key]


def _checkpoint_grid(state_dict: dict[str, torch.Tensor], path: str) -> tuple[int, int]:
    """``(grid, patch_size)`` of a state dict: ``pos_embed`` holds ``grid**2`` patches + the cls token."""
    patch = _need(state_dict, "patch_embed.proj.weight", path)  # (embed, in_chans, p, p)
    pos_embed = _need(state_dict, "pos_embed", path)  # (1, grid**2 + 1, embed)
    num_patches = pos_embed.shape[1] - 1 if pos_embed.dim() == 3 else -1
    grid = math.isqrt(max(num_patches, 0))
    if num_patches <= 0 or grid * grid != num_patches or patch.dim() != 4 or patch.shape[2] != patch.shape[3]:
        raise VimCheckpointError(f"{path}: only square images/patches are supported (pos_embed "
                                 f"{tuple(pos_embed.shape)}, patch_embed.proj.weight {tuple(patch.shape)})")
    return grid, patch.shape[2]


def infer_vim_geometry(state_dict: dict[str, torch.Tensor], path: str = "<state dict>",
                       preferred: VimGeometry | None = None) -> VimGeometry:
    """The ``(img_size, patch_size, stride)`` whose patch grid matches ``pos_embed``.

    Tries ``preferred`` (e.g. from the caller's config) first, then :func:`standard_vim_geometries`
    of the checkpoint's patch kernel; raises :class:`VimCheckpointError` if none matches.
    """
    grid, patch_size = _checkpoint_grid(state_dict, path)
    tried = [preferred] if preferred is not None else []
    tried += [g for g in standard_vim_geometries(patch_size) if g != preferred]
    for geometry in tried:
        if geometry.patch_size == patch_size and geometry.grid_size == grid:
            return geometry
    shape = tuple(state_dict["pos_embed"].shape)
    raise VimCheckpointError(
        f"{path}: pos_embed {shape} holds a {grid}x{grid} patch grid, which no (img_size, patch_size, stride) "
        f"tried gives for the {patch_size}x{patch_size} patch kernel; tried "
        f"{'; '.join(g.describe() for g in tried) or 'none'}; pass a VimConfig with the checkpoint's img_size "
        f"and stride, e.g. load_vim_checkpoint(path, VimConfig(img_size=..., patch_size={patch_size}, stride=...))")


def infer_vim_config(state_dict: dict[str, torch.Tensor], path: str = "<state dict>",
                     preferred: VimGeometry | None = None) -> VimConfig:
    """Read a :class:`VimConfig` off the tensor shapes of a Vim state dict.

    The image size and stride come from :func:`infer_vim_geometry` (a 729-patch ``p16`` checkpoint is
    224 px with stride 8); the rest from the shapes of the patch kernel, ``A_log``, the projections
    and the head.
    """
    def need(key: str) -> torch.Tensor:
        return _need(state_dict, key, path)

    geometry = infer_vim_geometry(state_dict, path, preferred)
    patch = need("patch_embed.proj.weight")
    embed_dim, in_chans = patch.shape[0], patch.shape[1]
    layers = {int(m.group(1)) for k in state_dict if (m := _LAYER_KEY.match(k))}
    depth = max(layers) + 1 if layers else 0
    A_log = need("layers.0.mixer.A_log")  # (d_inner, d_state)
    d_inner, d_state = A_log.shape
    if d_inner % embed_dim:
        raise VimCheckpointError(f"{path}: d_inner={d_inner} is not a multiple of embed_dim={embed_dim}")
    head = state_dict.get("head.weight")
    return VimConfig(
        img_size=geometry.img_size, patch_size=geometry.patch_size, stride=geometry.stride, in_chans=in_chans,
        embed_dim=embed_dim, depth=depth, d_state=d_state, d_conv=need("layers.0.mixer.conv1d.weight").shape[-1],
        expand=d_inner // embed_dim, dt_rank=need("layers.0.mixer.dt_proj.weight").shape[1],
        num_classes=head.shape[0] if head is not None else 0,
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


def _check_geometry(state_dict: dict[str, torch.Tensor], config: VimConfig, path: str) -> None:
    """Refuse a ``config`` whose patch grid does not match ``pos_embed``, naming a layout that would."""
    if "pos_embed" not in state_dict or "patch_embed.proj.weight" not in state_dict:
        return  # check_vim_state_dict names the missing keys
    given = VimGeometry(config.img_size, config.patch_size, config.stride)
    grid, patch_size = _checkpoint_grid(state_dict, path)
    if given.grid_size == grid and patch_size == config.patch_size:
        return
    shape = tuple(state_dict["pos_embed"].shape)
    try:
        fit = infer_vim_geometry(state_dict, path)
        hint = f"the checkpoint matches {fit.describe()}; pass a VimConfig with img_size={fit.img_size}, " \
               f"patch_size={fit.patch_size}, stride={fit.stride}"
    except VimCheckpointError:
        hint = "pass a VimConfig with the checkpoint's img_size, patch_size and stride"
    raise VimCheckpointError(
        f"{path}: pos_embed {shape} and the {patch_size}x{patch_size} patch kernel hold a {grid}x{grid} patch grid, "
        f"but the given VimConfig {given.describe()}; {hint}")


def load_vim_checkpoint(path: str | Path, config: VimConfig | None = None, *,
                        map_location: str | torch.device = "cpu",
                        preferred: VimGeometry | None = None) -> VisionMamba:
    """Build a :class:`VisionMamba` from a public Vim ``.pth`` file (``{"model": state_dict}``).

    Without ``config`` the architecture is inferred from the tensor shapes, the image size and stride
    from the ``pos_embed`` length and the patch kernel (224 px with stride ``p`` or ``p / 2``, so the
    stride-8 Vim-Ti+/S+ load as 224-px stride-8 models), trying ``preferred`` first; other layouts need
    a ``config`` or ``preferred``. With a ``config``, it is checked against the file. Keys and shapes
    are checked strictly (:class:`VimCheckpointError` names every missing/unexpected key and mismatched
    shape, and the file).
    """
    path = str(path)
    obj = load_tensors_file(path, "Vim checkpoint", map_location)
    state_dict = _extract_state_dict(obj, path)
    if config is None:
        config = infer_vim_config(state_dict, path, preferred)
    else:
        config = replace(config)  # do not share a mutable config with the caller
        _check_geometry(state_dict, config, path)
    model = VisionMamba(config)
    check_vim_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return model


__all__ = [
    "RMSNorm", "STANDARD_IMG_SIZE", "VIM_PRESETS", "VimBlock", "VimCheckpointError", "VimConfig", "VimGeometry",
    "VimMixer", "VisionMamba", "check_vim_state_dict", "infer_vim_config", "infer_vim_geometry",
    "load_vim_checkpoint", "standard_vim_geometries", "vim_base", "vim_small", "vim_tiny",
]


"""Vision Mamba (Vim): shapes, the bidirectional mixer's math, adapters, checkpoint loading."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lily_ssm
from lily_ssm.models.vim import (
    VimCheckpointError,
    VimConfig,
    VimGeometry,
    VimMixer,
    VisionMamba,
    infer_vim_config,
    load_vim_checkpoint,
    vim_base,
    vim_small,
    vim_tiny,
)
from lily_ssm.ops import selective_scan_ref

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_classes=5)


def tiny_vim(seed: int = 0) -> VisionMamba:
    torch.manual_seed(seed)
    model = VisionMamba(VimConfig(**TINY)).eval()
    with torch.no_grad():  # make the two directions clearly different
        for name, p in model.named_parameters():
            if name.endswith(("conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.weight", "D_b", "A_b_log")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def expected_keys(depth: int) -> set[str]:
    keys = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm_f.weight",
            "head.weight", "head.bias"}
    mixer = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "conv1d_b.weight", "conv1d_b.bias", "x_proj.weight",
             "x_proj_b.weight", "dt_proj.weight", "dt_proj.bias", "dt_proj_b.weight", "dt_proj_b.bias", "A_log",
             "A_b_log", "D", "D_b", "out_proj.weight"]
    for i in range(depth):
        keys.add(f"layers.{i}.norm.weight")
        keys.update(f"layers.{i}.mixer.{k}" for k in mixer)
    return keys


def test_presets_and_config():
    small = vim_small()
    assert (small.embed_dim, small.depth, small.d_inner, small.dt_rank, small.d_state) == (384, 24, 768, 24, 16)
    assert (vim_tiny().embed_dim, vim_tiny().dt_rank, vim_base().embed_dim, vim_base().dt_rank) == (192, 12, 768, 48)
    assert VimConfig(embed_dim=33).dt_rank == 3
    assert vim_small(num_classes=10).num_classes == 10


def test_forward_shapes_and_key_layout():
    model = tiny_vim()
    assert model.config.num_patches == 16 and model.token_position == 8
    assert model(images(3)).shape == (3, 5)
    assert model.forward_features(images(3)).shape == (3, 32)
    sd = model.state_dict()
    assert set(sd) == expected_keys(2)
    assert sd["pos_embed"].shape == (1, 17, 32) and sd["cls_token"].shape == (1, 1, 32)
    assert sd["layers.0.mixer.in_proj.weight"].shape == (128, 32)
    assert sd["layers.0.mixer.x_proj_b.weight"].shape == (2 + 2 * 16, 64)
    assert sd["layers.0.mixer.dt_proj_b.weight"].shape == (64, 2)
    assert sd["layers.0.mixer.conv1d_b.weight"].shape == (64, 1, 4)


def _reference_direction(x, z, conv, x_proj, dt_proj, A_log, D, dt_rank, d_state):
    """Plain Mamba math on ``x, z (b, d, t)`` with the sequential reference scan."""
    d_conv = conv.weight.shape[-1]
    x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=d_conv - 1, groups=x.shape[1])[..., : x.shape[-1]])
    proj = x.transpose(1, 2) @ x_proj.weight.T
    dt, B, C = proj.split([dt_rank, d_state, d_state], dim=-1)
    delta = F.softplus(dt @ dt_proj.weight.T + dt_proj.bias)
    return selective_scan_ref(x, delta.transpose(1, 2), -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2), D,
                              z=z, delta_softplus=False)


def reference_mixer(m: VimMixer, h: torch.Tensor) -> torch.Tensor:
    xz = h @ m.in_proj.weight.T
    x, z = xz[..., : m.d_inner].transpose(1, 2), xz[..., m.d_inner:].transpose(1, 2)
    y_f = _reference_direction(x, z, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, m.dt_rank, m.d_state)
    # backward branch: run on the time-reversed sequence, then reverse its output back
    xr, zr = torch.flip(x, dims=[-1]), torch.flip(z, dims=[-1])
    y_b = _reference_direction(xr, zr, m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b, m.dt_rank, m.d_state)
    y = (y_f + torch.flip(y_b, dims=[-1])) / 2
    return y.transpose(1, 2) @ m.out_proj.weight.T


@torch.no_grad()
def test_mixer_matches_explicit_bidirectional_math():
    mixer = tiny_vim().layers[0].mixer
    h = torch.randn(2, 11, 32)
    torch.testing.assert_close(mixer(h), reference_mixer(mixer, h), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_backward_branch_sees_the_flipped_sequence():
    mixer = tiny_vim().layers[0].mixer
    h = torch.randn(1, 9, 32)
    base = mixer(h)
    h2 = h.clone()
    h2[:, -1] += 1.0  # only the last token changes
    diff = (mixer(h2) - base).abs().amax(-1)[0]
    assert (diff[:-1] > 1e-4).all()  # earlier positions see it: only possible through the backward branch
    # with the backward branch's parameters equal to the forward branch's, flipping the input flips the output
    for a, b in (("conv1d", "conv1d_b"), ("x_proj", "x_proj_b"), ("dt_proj", "dt_proj_b")):
        getattr(mixer, b).load_state_dict(getattr(mixer, a).state_dict())
    mixer.A_b_log.copy_(mixer.A_log)
    mixer.D_b.copy_(mixer.D)
    torch.testing.assert_close(mixer(h.flip(1)), mixer(h).flip(1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("target", ["in_proj", "dt_proj", "dt_proj_b"])
def test_lily_adapter_on_vim(target):
    base = tiny_vim()
    x = images(2)
    with torch.no_grad():
        base_logits = base(x)
    model = lily_ssm.apply_adapter(copy.deepcopy(base), lily_ssm.LilyConfig(
        [target], r=2, num_A=2, num_B=2, routing="token", router="global"))
    adapted = [n for n, _ in model.named_modules() if n.endswith("mixer." + target)]
    assert len(adapted) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), base_logits)  # B experts start at zero
        params = list(model.lily_ssm_adapter.parameters())
        assert params
        for p in params:
            p.copy_(0.5 * torch.randn_like(p))
    logits = model(x)
    assert (logits - base_logits).abs().max() > 1e-4
    logits.square().sum().backward()
    for name, p in model.lily_ssm_adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("lily_ssm_adapter"))


def _save(tmp_path, sd, name="vim.pth"):
    path = tmp_path / name
    torch.save({"model": sd}, path)
    return path


def test_checkpoint_round_trip(tmp_path):
    model = tiny_vim(seed=3)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(sd) == expected_keys(2)
    path = _save(tmp_path, sd)
    # a 32-px model is no standard (224-px) layout: the geometry comes from the caller
    assert infer_vim_config(sd, preferred=VimGeometry(32, 8, 8)) == model.config
    loaded = load_vim_checkpoint(path, VimConfig(**TINY))
    assert loaded.config == model.config and loaded.config.stride == 8
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), atol=0, rtol=0)


def test_checkpoint_errors(tmp_path):
    sd = tiny_vim().state_dict()
    config = VimConfig(**TINY)

    missing = dict(sd)
    del missing["layers.1.mixer.D_b"]
    with pytest.raises(VimCheckpointError, match=r"(?s)missing.*layers\.1\.mixer\.D_b") as err:
        load_vim_checkpoint(_save(tmp_path, missing, "missing.pth"), config)
    assert "missing.pth" in str(err.value)

    extra = dict(sd, **{"layers.0.mixer.bogus": torch.zeros(3)})
    with pytest.raises(VimCheckpointError, match=r"(?s)unexpected.*layers\.0\.mixer\.bogus"):
        load_vim_checkpoint(_save(tmp_path, extra, "extra.pth"), config)

    wrong = dict(sd, **{"layers.1.mixer.x_proj_b.weight": torch.zeros(7, 64)})
    with pytest.raises(VimCheckpointError, match=r"(?s)mismatched.*layers\.1\.mixer\.x_proj_b\.weight"):
        load_vim_checkpoint(_save(tmp_path, wrong, "wrong.pth"), config)

    # an explicit config that disagrees with the file
    with pytest.raises(VimCheckpointError, match=r"head\.weight"):
        load_vim_checkpoint(_save(tmp_path, sd, "ok.pth"), VimConfig(**{**TINY, "num_classes": 7}))

    torch.save({"state": 1}, tmp_path / "bad.pth")
    with pytest.raises(VimCheckpointError, match="bad.pth"):
        load_vim_checkpoint(tmp_path / "bad.pth")


def test_scan_and_conv_go_through_the_kernel_dispatch():
    from lily_ssm.ops import kernels
    from lily_ssm.ops.conv import causal_conv1d_ref

    model = tiny_vim()
    x = images(2)
    calls = {"scan": 0, "conv": 0}

    def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        calls["scan"] += 1
        assert delta_bias is not None and delta_softplus  # Δ bias handed over separately, as the kernel takes it
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    def conv(x, weight, bias, activation=None):
        calls["conv"] += 1
        return causal_conv1d_ref(x, weight, bias, activation)

    with torch.no_grad():
        expected = model(x)
        with kernels.override(devices=("cpu",), selective_scan_fn=scan, causal_conv1d_fn=conv):
            got = model(x)
    assert calls == {"scan": 4, "conv": 4}  # two directions x two layers
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

"""No adapter is silently dead: a forward that bypasses an adapted module is refused, naming it, on the
first forward of each mode; modules whose parent does not run make no claim."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_adapter, tiny_mamba
from torch import nn

import lily_ssm
from lily_ssm.modules import unpatch_mamba_mixers
from lily_ssm.tuners.liveness import DeadAdapterError


class Block(nn.Module):
    """``up`` is always called; ``side`` is read as a weight (``side.weight @ x``) in the chosen modes."""

    def __init__(self, bypass_when) -> None:
        super().__init__()
        self.up, self.side = nn.Linear(8, 8), nn.Linear(8, 8)
        self.bypass_when = bypass_when

    def forward(self, x: torch.Tensor, decoding: bool) -> torch.Tensor:
        side = x @ self.side.weight.T if self.bypass_when(self.training, decoding) else self.side(x)
        return self.up(x) + side


class Net(nn.Module):
    def __init__(self, bypass_when, skip_second: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(bypass_when), Block(lambda *_: False)])
        self.skip_second = skip_second

    def forward(self, input_ids: torch.Tensor, cache: object = None) -> torch.Tensor:
        x = input_ids.float()
        decoding = cache is not None and x.shape[1] == 1
        x = self.layers[0](x, decoding)
        return x if self.skip_second else self.layers[1](x, decoding)


def _adapted(bypass_when, **kw):
    return lily_ssm.apply_adapter(Net(bypass_when, **kw).eval(), lily_ssm.LoraConfig(["up", "side"], r=2, alpha=2.0))


X = torch.randn(2, 5, 8)


def test_a_bypassed_projection_is_refused_by_name():
    model = _adapted(lambda training, decoding: True)
    with pytest.raises(DeadAdapterError, match=r"adapters on layers\.0\.side did not run \(evaluation, with "
                                               r"gradients, on cpu\): their parent modules \(Block\) ran"):
        model(X)


def test_each_mode_is_checked_on_its_first_forward():
    """A bypass only in training, or only in cached decoding, is caught when that mode first runs."""
    model = _adapted(lambda training, decoding: training)
    model(X)  # evaluation: fine
    model.train()
    with pytest.raises(DeadAdapterError, match="training, with gradients"):
        model(X)
    model = _adapted(lambda training, decoding: decoding)
    model(X, cache=object())  # a prefill: several tokens
    with pytest.raises(DeadAdapterError, match="cached decoding"):
        model(X[:, :1], cache=object())


def test_a_parent_that_does_not_run_makes_no_claim():
    model = _adapted(lambda *_: False, skip_second=True)  # layer 1 never runs: its adapters are not dead
    model(X)
    model(X)  # and the check is not repeated
    assert not model.layers[0].up._lily_liveness.probing


def test_transformers_own_mamba_mixer_would_leave_dt_proj_dead():
    """Without lily-ssm's mixer forward, transformers computes dt_proj.weight @ time_step: caught."""
    model = lily_ssm.apply_adapter(tiny_mamba("falcon"), lily_ssm.LoraConfig(["in_proj", "dt_proj"], r=2, alpha=4.0))
    randomise_adapter(model)
    unpatch_mamba_mixers(model)
    with pytest.raises(DeadAdapterError, match=r"backbone\.layers\.0\.mixer\.dt_proj.*FalconMambaMixer"):
        model(torch.randint(2, 64, (1, 6)))

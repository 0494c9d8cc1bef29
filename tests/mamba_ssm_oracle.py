"""Run mamba-ssm's own MambaLMHeadModel on CPU, from its published sources, as the oracle for native checkpoints.

Not a test module: ``test_native_checkpoints.py`` runs it in a subprocess (so the stand-in ``mamba_ssm`` package
never meets lily-ssm's own kernel detection) as

    python tests/mamba_ssm_oracle.py SDIST CONFIG_JSON FOLDER IDS_JSON LOGITS

It builds ``MambaLMHeadModel(MambaConfig(**config))`` with mamba-ssm's own initialisation, moves every parameter off
its initial value, writes ``FOLDER`` with mamba-ssm's ``save_pretrained`` (the layout users have), and writes the
logits for ``IDS_JSON`` to ``LOGITS`` (safetensors). Only the CUDA and Triton kernels are replaced, each by the
PyTorch reference mamba-ssm ships beside it: ``selective_scan_ref`` for the selective scan, ``ssd_minimal_discrete``
for the SSD scan, and the ``rms_norm_ref`` of ``layer_norm.py`` and ``layernorm_gated.py`` for the norms. Its
unfused residual/norm path and the Mamba-2 path without the memory-efficient kernel are mamba-ssm's own code.
Needs ``einops`` and ``triton`` (imported, never launched).
"""

from __future__ import annotations

import importlib
import json
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F


def import_mamba_ssm(sdist: Path, into: Path) -> dict[str, types.ModuleType]:
    """mamba-ssm's Python modules from ``sdist``, importable without its CUDA extension or package ``__init__``
    (which imports Mamba-3's kernels)."""
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if "/mamba_ssm/" in m.name and m.name.endswith(".py")]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # 3.11.4 and later
        archive.extractall(into, members=members, **safe)
    (root,) = into.iterdir()
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(root / "mamba_ssm")]
    sys.modules["mamba_ssm"] = package
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")  # imported, never called
    names = {"scan": "ops.selective_scan_interface", "norm": "ops.triton.layer_norm",
             "gated_norm": "ops.triton.layernorm_gated", "ssd": "modules.ssd_minimal",
             "mamba1": "modules.mamba_simple", "mamba2": "modules.mamba2", "model": "models.mixer_seq_simple",
             "config": "models.config_mamba"}
    return {key: importlib.import_module(f"mamba_ssm.{name}") for key, name in names.items()}


def use_references(ms: dict[str, types.ModuleType]) -> None:
    """Swap each kernel for mamba-ssm's PyTorch reference of it."""
    ms["mamba1"].selective_scan_fn = ms["scan"].selective_scan_ref
    ms["norm"].RMSNorm.forward = lambda self, x, **_: ms["norm"].rms_norm_ref(x, self.weight, self.bias, eps=self.eps)
    ms["gated_norm"].RMSNorm.forward = lambda self, x, z=None: ms["gated_norm"].rms_norm_ref(
        x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
        norm_before_gate=self.norm_before_gate)

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, float("inf")), **_):
        # mamba_chunk_scan_combined's contract, computed by ssd_minimal_discrete (as mamba-ssm's tests use it):
        # Δ = softplus(dt + dt_bias) clamped to dt_limit; head h reads group h // (heads / groups).
        assert z is None, "the oracle covers rmsnorm=True, where the gate goes to the norm"
        dt = dt + dt_bias if dt_bias is not None else dt
        dt = (F.softplus(dt) if dt_softplus else dt).clamp(*dt_limit)
        per_group = x.shape[2] // B.shape[2]
        B, C = B.repeat_interleave(per_group, dim=2), C.repeat_interleave(per_group, dim=2)
        y, _ = ms["ssd"].ssd_minimal_discrete(x * dt[..., None], A * dt, B, C, block_len=chunk_size)
        return y + x * (D[:, None] if D.dim() == 1 else D)

    ms["mamba2"].mamba_chunk_scan_combined = chunk_scan


def main(sdist: str, config_json: str, folder: str, ids_json: str, logits_path: str) -> None:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as scratch:
        ms = import_mamba_ssm(Path(sdist), Path(scratch))
        use_references(ms)
        torch.manual_seed(0)
        model = ms["model"].MambaLMHeadModel(ms["config"].MambaConfig(**json.loads(config_json)))
        with torch.no_grad():  # off mamba-ssm's init (norms at 1, D at 1, ...), so a dropped term shows
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        model.save_pretrained(folder)
        model.eval()
        model.backbone.fused_add_norm = False  # mamba-ssm's unfused add + norm: the same function, no Triton
        for block in model.backbone.layers:
            block.fused_add_norm = False
            block.mixer.use_fast_path = False  # Mamba-1: conv1d + selective_scan_fn instead of mamba_inner_fn
            block.mixer.use_mem_eff_path = False  # Mamba-2: conv1d + mamba_chunk_scan_combined
        with torch.no_grad():
            logits = model(torch.tensor(json.loads(ids_json))).logits
    save_file({"logits": logits.contiguous()}, logits_path)


if __name__ == "__main__":
    main(*sys.argv[1:])

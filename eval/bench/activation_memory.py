"""Saved activations per token of one Falcon-Mamba-7B mixer (d_model 4096, d_inner 8192, state 16,
dt_rank 256) in bf16 with Lily on in_proj (r 40) and dt_proj (r 8), the block's RMSNorm left out:
lily-ssm unfused ("before") and fused ("after"), on the CPU path and on the GPU path's structure (the
CUDA kernels replaced by stand-ins that save what they save), beside mamba_ssm's fused
``mamba_inner_fn`` (checkpoint_lvl=1, the named peer; a stand-in saving what it saves).

    python eval/bench/activation_memory.py [--batch 4] [--tokens 256]

Everything runs on the meta device (shapes only): no memory, no compute, seconds on a laptop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SHAPE = {"vocab_size": 65024, "hidden_size": 4096, "intermediate_size": 8192, "num_hidden_layers": 1,
         "state_size": 16, "time_step_rank": 256, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True}


def _mixer():
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    import lily_ssm

    with torch.device("meta"):
        model = FalconMambaForCausalLM(FalconMambaConfig(**SHAPE)).to(torch.bfloat16)
    lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj", "dt_proj"], r=40, num_A=1, num_B=4,
                                                      routing="causal", overrides={"dt_proj": {"r": 8}}))
    model.train()
    return model, model.backbone.layers[0].mixer


def measure(arm: str, batch: int, tokens: int) -> float:
    """Saved KiB per token of one mixer forward for ``arm``."""
    from lily_ssm.analysis.memory import saved_bytes
    from lily_ssm.modules.recompute import unfused
    from lily_ssm.ops.standins import gpu_structure, mamba_inner_standin

    model, mixer = _mixer()
    hidden = torch.empty(batch, tokens, SHAPE["hidden_size"], dtype=torch.bfloat16, device="meta",
                         requires_grad=True)  # inside a network: earlier adapters make it require grad
    if arm == "mamba_inner_fn":
        def step():
            xz = mixer.in_proj(hidden).transpose(1, 2)  # in_proj and its adapter, as in transformers' fast path
            mamba_inner_standin(xz, mixer)
        structure = contextlib.nullcontext()
    else:
        def step():
            mixer(hidden)
        structure = gpu_structure(("meta",)) if arm.startswith("gpu") else contextlib.nullcontext()
    with structure, (unfused() if arm.endswith("before") else contextlib.nullcontext()):
        total = saved_bytes(step, exclude=list(model.parameters()))
    return total / (batch * tokens) / 1024


ARMS = {"cpu-before": "CPU path, unfused", "cpu-after": "CPU path, fused", "gpu-before": "GPU structure, unfused",
        "gpu-after": "GPU structure, fused", "mamba_inner_fn": "mamba_inner_fn (peer)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    kib = {arm: measure(arm, args.batch, args.tokens) for arm in ARMS}
    peer = kib["mamba_inner_fn"]
    rows = [[label, f"{kib[arm]:.1f}", f"{kib[arm] / peer:.2f}"] for arm, label in ARMS.items()]
    print(f"\nsaved activations of one Falcon-Mamba-7B mixer, bf16, Lily in_proj r40 + dt_proj r8, "
          f"{args.batch} x {args.tokens} tokens (peer: mamba_inner_fn)")
    common.print_table(["path", "KiB / token", "vs peer"], rows)


if __name__ == "__main__":
    main()

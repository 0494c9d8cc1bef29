"""One Falcon-Mamba-7B-shaped in_proj (4096 -> 16384), 256 tokens, forward + backward:
Lily r40 A4 B4 in every routing mode vs LoRA r2 (the named peer), as in the paper's Falcon-Mamba runs.

    python eval/bench/lily_layer.py [--tokens 256] [--batch 1] [--repeats 7] [--threads 2] [--parts ...]

"layer" times the whole adapted projection (frozen base matmul included, input gradient computed as
inside a network); "adapter" times the adapter's contribution alone; "mixer" times one whole
Falcon-Mamba-7B mixer (fused core: in_proj, convolution, x_proj, Δ, scan, out_proj), Lily on in_proj vs
the paper's LoRA baseline (r 2 on in_proj and dt_proj). The pools serve 4 layers (so num_A=4 is
meaningful); layer 0 is timed. All arms of a part run in one process, their steps interleaved, and each
reports its median step.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

IN, OUT, LAYERS = 4096, 16384, 4
ARMS = ["lora", "lily-sequence", "lily-causal", "lily-token", "lily-batch"]


def _mixer_arm(arm: str, spec: dict):
    """A 4-layer Falcon-Mamba at the 7B width with ``arm``'s adapter; returns (step function, trainable)."""
    import torch
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    import lily_ssm

    torch.manual_seed(0)
    model = FalconMambaForCausalLM(FalconMambaConfig(vocab_size=16, hidden_size=IN, intermediate_size=OUT // 2,
                                                     num_hidden_layers=LAYERS, state_size=16, time_step_rank=256,
                                                     conv_kernel=4))
    if arm == "lora":
        config = lily_ssm.LoraConfig(["in_proj", "dt_proj"], r=2, alpha=4.0)
    else:
        config = lily_ssm.LilyConfig(["in_proj"], r=40, num_A=4, num_B=4, routing=arm.split("-")[1],
                                     allow_lookahead=True)
    lily_ssm.apply_adapter(model, config)
    model.train()
    return _stepper(model, model.backbone.layers[0].mixer, spec), lily_ssm.parameter_report(model).adapter_total


def _projection_arm(arm: str, spec: dict):
    """Four 7B in_proj layers sharing ``arm``'s pools; returns (step function for layer 0, trainable)."""
    import torch
    from torch import nn

    import lily_ssm

    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(LAYERS):
        block = nn.Module()
        block.in_proj = nn.Linear(IN, OUT, bias=False)
        model.layers.append(block)
    if arm == "lora":
        config = lily_ssm.LoraConfig(["in_proj"], r=2, alpha=4.0)
    else:
        config = lily_ssm.LilyConfig(["in_proj"], r=40, num_A=4, num_B=4, routing=arm.split("-")[1],
                                     allow_lookahead=True)
    lily_ssm.apply_adapter(model, config)
    layer = model.layers[0].in_proj
    (pool, slot), = layer._lily_adapters
    fn = layer if spec["part"] == "layer" else (lambda inp: pool.delta(inp, slot))
    return _stepper(model, fn, spec), lily_ssm.parameter_report(model).adapter_total


def _stepper(model, fn, spec: dict):
    import torch

    with torch.no_grad():
        for p in model.lily_ssm_adapter.parameters():
            p.normal_(std=0.02)
    x = torch.randn(spec["batch"], spec["tokens"] // spec["batch"], IN, requires_grad=True)

    def step():
        x.grad = None
        for p in model.lily_ssm_adapter.parameters():
            p.grad = None
        fn(x).sum().backward()

    return step


def worker(spec: dict) -> None:
    """Every arm of one part in this process, their steps interleaved (arm 1, arm 2, ..., then again), so a
    slow spell of the machine touches every arm alike."""
    import torch

    # A decaying SSM state reaches denormal floats, which slow x86 arithmetic down by data-dependent amounts
    # (up to 20% of a mixer step here); flushing them to zero in every arm keeps the ratio about the adapters.
    torch.set_flush_denormal(True)
    build = _mixer_arm if spec["part"] == "mixer" else _projection_arm
    arms = {arm: build(arm, spec) for arm in ARMS}
    times = common.time_interleaved({arm: step for arm, (step, _) in arms.items()}, spec["repeats"], warmup=2)
    common.emit({arm: {"median_s": times[arm], "trainable": trainable} for arm, (_, trainable) in arms.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="layer,adapter,mixer", help="comma-separated: layer, adapter, mixer")
    args = parser.parse_args()
    parts = args.parts.split(",")
    results = {}
    for part in parts:
        print(f"  running the {part} arms ...", file=sys.stderr, flush=True)
        found = common.run_arm(__file__, {"part": part, "tokens": args.tokens, "batch": args.batch,
                                          "repeats": args.repeats}, args.threads)
        for arm in ARMS:
            results[part, arm] = found.get(arm, found)
    rows = []
    for arm in ARMS:
        row = [arm]
        for part in parts:
            result, peer = results[part, arm], results[part, "lora"]
            value = f"{result.get('median_s', 0) * 1e3:.1f}" if part == "adapter" else common.fmt_s(result)
            row += [f"{result.get('trainable', 0):,}", value, common.ratio(result, peer)]
        rows.append(row)
    print(f"\n7B shapes, {args.tokens} tokens (batch {args.batch}), fwd+bwd, {args.threads} threads (peer: LoRA r2; "
          "layer/adapter: in_proj only, mixer: LoRA on in_proj + dt_proj)")
    units = {"layer": "s", "adapter": "ms", "mixer": "s"}
    headers = ["arm"] + [h for part in parts for h in (f"{part} params", f"{part} {units[part]}", f"{part}/peer")]
    common.print_table(headers, rows)


if __name__ == "__main__":
    spec = common.worker_spec()
    worker(spec) if spec else main()

"""One Falcon-Mamba-7B-shaped in_proj (4096 -> 16384), 256 tokens, forward + backward:
Lily r40 A4 B4 in every routing mode vs LoRA r2 (the named peer), as in the paper's Falcon-Mamba runs.

    python eval/bench/lily_layer.py [--tokens 256] [--batch 1] [--repeats 5] [--threads 2]

"layer" times the whole adapted projection (frozen base matmul included, input gradient computed as
inside a network); "adapter" times the adapter's contribution alone. The pools serve 4 layers (so
num_A=4 is meaningful); layer 0 is timed.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

IN, OUT, LAYERS = 4096, 16384, 4
ARMS = ["lora", "lily-sequence", "lily-causal", "lily-token", "lily-batch"]


def worker(spec: dict) -> None:
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
    if spec["arm"] == "lora":
        config = lily_ssm.LoraConfig(["in_proj"], r=2, alpha=4.0)
    else:
        config = lily_ssm.LilyConfig(["in_proj"], r=40, num_A=4, num_B=4, routing=spec["arm"].split("-")[1])
    lily_ssm.apply_adapter(model, config)
    with torch.no_grad():
        for p in model.lily_ssm_adapter.parameters():
            p.normal_(std=0.02)
    layer = model.layers[0].in_proj
    (pool, slot), = layer._lily_adapters
    x = torch.randn(spec["batch"], spec["tokens"] // spec["batch"], IN, requires_grad=True)
    fn = layer if spec["part"] == "layer" else (lambda inp: pool.delta(inp, slot))

    def step():
        x.grad = None
        for p in model.lily_ssm_adapter.parameters():
            p.grad = None
        fn(x).sum().backward()

    result = common.time_repeated(step, spec["repeats"], warmup=2)
    result["trainable"] = lily_ssm.parameter_report(model).adapter_total
    common.emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results = {}
    for part in ("layer", "adapter"):
        for arm in ARMS:
            print(f"  running {arm} ({part}) ...", file=sys.stderr, flush=True)
            spec = {"arm": arm, "part": part, "tokens": args.tokens, "batch": args.batch, "repeats": args.repeats}
            results[part, arm] = common.run_arm(__file__, spec, args.threads)
    rows = []
    for arm in ARMS:
        layer, adapter = results["layer", arm], results["adapter", arm]
        rows.append([arm, f"{layer.get('trainable', 0):,}", common.fmt_s(layer),
                     common.ratio(layer, results["layer", "lora"]), f"{adapter.get('median_s', 0) * 1e3:.1f}",
                     common.ratio(adapter, results["adapter", "lora"])])
    print(f"\nadapted in_proj {IN}->{OUT}, {args.tokens} tokens (batch {args.batch}), fwd+bwd, {args.threads} threads "
          "(peer: LoRA r2)")
    common.print_table(["arm", "trainable (4 layers)", "layer s", "layer/peer", "adapter ms", "adapter/peer"], rows)


if __name__ == "__main__":
    spec = common.worker_spec()
    worker(spec) if spec else main()

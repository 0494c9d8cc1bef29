"""Train-step throughput and peak memory of a 4-layer Falcon-Mamba at the 7B width (d_model 4096,
d_inner 8192, state 16, dt_rank 256) in bf16, micro-batch 4 x 256 tokens, AdamW:

- lily-ssm Lily on in_proj (r 40, 4 A, 4 B; the paper's setting);
- lily-ssm Lily on in_proj + dt_proj (dt_proj r 12, the paper's Δ + in);
- PEFT's Lily on in_proj (r 40, the same 4 A, 4 B) on stock transformers, the named peer (when peft
  imports; stock transformers runs its own scan: mamba-ssm's kernels if installed, else its PyTorch loop).

    python eval/bench/gpu_step.py [--out gpu-check] [--steps 10] [--device cuda]

Each arm runs in its own process. Writes ``gpu_step.json`` and ``gpu_step.md`` into ``--out``.
``--device cpu --hidden 64 --inner 128 --vocab 256`` runs the same code tiny on a CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ARMS = {"lily-in": "lily-ssm Lily, in_proj", "lily-dt-in": "lily-ssm Lily, in_proj + dt_proj",
        "peft-lily-in": "PEFT Lily, in_proj, stock transformers (peer)"}


def worker(spec: dict) -> None:
    import time

    import torch
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    config = FalconMambaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                               intermediate_size=spec["inner"], num_hidden_layers=spec["layers"], state_size=16,
                               time_step_rank=spec["dt_rank"], conv_kernel=4, tie_word_embeddings=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:  # initialised where it runs: a billion parameters initialise slowly on a CPU
        model = FalconMambaForCausalLM(config).to(dtype)
    num_a = min(4, spec["layers"])  # the paper's 4 A experts (one per layer at 4 layers)
    if spec["arm"] == "peft-lily-in":
        try:
            from peft import LilyConfig, get_peft_model
        except ImportError as exc:
            common.emit({"skipped": f"peft does not import: {exc}"})
            return
        stride = -(-spec["layers"] // num_a)
        model = get_peft_model(model, LilyConfig(r=40, stride_A=stride, num_B=4, target_modules=["in_proj"]))
    else:
        import lily_ssm

        overrides = {"dt_proj": {"r": 12}} if spec["arm"] == "lily-dt-in" else {}
        targets = ["in_proj", "dt_proj"] if spec["arm"] == "lily-dt-in" else ["in_proj"]
        lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(targets, r=40, num_A=num_a, num_B=4, routing="causal",
                                                          overrides=overrides))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(2, spec["vocab"], (spec["batch"], spec["tokens"]), device=device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(spec["warmup"]):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    result = {"median_s": median, "tokens_per_s": spec["batch"] * spec["tokens"] / median,
              "trainable": sum(p.numel() for p in params)}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    common.emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inner", type=int, default=8192)
    parser.add_argument("--dt-rank", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=65024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    spec = {k: getattr(args, k) for k in ("device", "steps", "warmup", "layers", "hidden", "inner", "dt_rank",
                                          "vocab", "batch", "tokens")}
    results = {}
    for arm in ARMS:
        print(f"  running {arm} ...", file=sys.stderr, flush=True)
        results[arm] = common.run_arm(__file__, {**spec, "arm": arm}, args.threads)
    peer = results["peft-lily-in"]
    rows = []
    for arm, label in ARMS.items():
        r = results[arm]
        if "error" in r or "skipped" in r:
            rows.append([label, "-", r.get("error") or r["skipped"], "-", "-", "-"])
            continue
        speed = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}" if "tokens_per_s" in peer else "-"
        memory = f"{r['peak_gib'] / peer['peak_gib']:.2f}" if "peak_gib" in r and "peak_gib" in peer else "-"
        rows.append([label, f"{r['trainable']:,}", f"{r['tokens_per_s']:,.0f}", speed,
                     f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-", memory])
    headers = ["arm", "trainable", "tokens/s", "speed vs peer", "peak GiB", "memory vs peer"]
    title = (f"{args.layers}-layer Falcon-Mamba, d_model {args.hidden}, d_inner {args.inner}, micro-batch "
             f"{args.batch} x {args.tokens}, AdamW train step on {args.device} (median of {args.steps})")
    print("\n" + title)
    common.print_table(headers, rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_step.json").write_text(json.dumps({"settings": spec, "results": results}, indent=1) + "\n")
    table = [f"| {' | '.join(headers)} |", "|" + "---|" * len(headers)] + [f"| {' | '.join(map(str, r))} |"
                                                                           for r in rows]
    (out / "gpu_step.md").write_text(f"{title}\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    worker_spec = common.worker_spec()
    worker(worker_spec) if worker_spec else main()

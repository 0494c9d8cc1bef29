"""One training step (forward, backward, AdamW) of a small Falcon-Mamba (hidden 256, 8 layers,
d_inner 512, d_state 16, vocab 8192), batch 4, sequence 256, adapters on in_proj.

    python eval/bench/adapter_step.py [--repeats 5] [--peft-repeats 2] [--threads 2] [--skip-peft]

Arms: lily-ssm Lily vs lily-ssm LoRA at (almost) equal trainable parameters — peer for the first
comparison is our LoRA; and lily-ssm Lily vs PEFT's Lily and PEFT's LoRA on the stock transformers
model — peer for the second is PEFT's Lily. PEFT steps take tens of seconds (transformers' CPU scan),
so they run --peft-repeats times without warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BATCH, LENGTH = 4, 256
LILY = {"r": 16, "num_A": 2, "num_B": 2}  # 41,216 trainable
LORA = {"r": 4, "alpha": 8.0}  # 40,960 trainable
ARMS = ["lily-ssm lily", "lily-ssm lora", "peft lily", "peft lora"]


def build(arm: str):
    import torch
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    import lily_ssm

    torch.manual_seed(0)
    config = FalconMambaConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                               state_size=16, time_step_rank=16, conv_kernel=4, use_cache=False)
    model = FalconMambaForCausalLM(config)
    if arm == "lily-ssm lily":
        lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj"], **LILY))
    elif arm == "lily-ssm lora":
        lily_ssm.apply_adapter(model, lily_ssm.LoraConfig(["in_proj"], **LORA))
    else:
        import peft

        if arm == "peft lily":
            cfg = peft.LilyConfig(r=LILY["r"], stride_A=8 // LILY["num_A"], num_B=LILY["num_B"],
                                  target_modules=["in_proj"])
        else:
            cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=["in_proj"])
        model = peft.get_peft_model(model, cfg)
    return model


def worker(spec: dict) -> None:
    import torch

    model = build(spec["arm"]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 8192, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = common.time_repeated(step, spec["repeats"], spec["warmup"])
    result["trainable"] = sum(p.numel() for p in params)
    common.emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peft-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peft", action="store_true", help="only the lily-ssm arms")
    args = parser.parse_args()
    results = {}
    for arm in ARMS:
        if arm.startswith("peft") and args.skip_peft:
            results[arm] = {}
            continue
        slow = arm.startswith("peft")
        spec = {"arm": arm, "repeats": args.peft_repeats if slow else args.repeats, "warmup": 0 if slow else 1}
        print(f"  running {arm} ...", file=sys.stderr, flush=True)
        results[arm] = common.run_arm(__file__, spec, args.threads)
        if "error" in results[arm]:
            print(f"  {arm}: {results[arm]['error']}", file=sys.stderr)
    ours_lora, peft_lily = results["lily-ssm lora"], results["peft lily"]
    rows = [[arm, f"{res.get('trainable', 0):,}", res.get("runs", "-"), common.fmt_s(res), common.fmt_mb(res),
             common.ratio(res, ours_lora), common.ratio(res, ours_lora, "peak_mb"), common.ratio(res, peft_lily)]
            for arm, res in results.items()]
    print(f"\ntraining step, Falcon-Mamba hidden 256 x 8 layers, batch {BATCH} x {LENGTH} tokens, adapters on in_proj, "
          f"{args.threads} threads")
    common.print_table(["arm", "trainable", "runs", "median s", "peak MB", "time/our LoRA", "mem/our LoRA",
                        "time/PEFT Lily"], rows)


if __name__ == "__main__":
    spec = common.worker_spec()
    worker(spec) if spec else main()

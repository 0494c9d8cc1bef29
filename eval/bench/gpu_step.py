"""Training and decoding on the GPU at the 7B width, against the fused peer, measured in the same run.

An L-layer Falcon-Mamba at the 7B width (d_model 4096, d_inner 8192, state 16, dt_rank 256, vocab 65024), bf16,
AdamW on the adapter, ``use_cache=False`` in training:

- ``lily-in``: lily-ssm Lily on in_proj (r 40, 4 A, 4 B; the paper's setting), causal routing;
- ``lily-dt-in``: the same plus dt_proj (r 12);
- ``lora-in``: lily-ssm LoRA on in_proj, r 8;
- ``peft-lora-in``: PEFT LoRA on in_proj, r 8, on stock transformers: with mamba-ssm and causal-conv1d installed,
  its fused ``mamba_inner_fn`` training path (transformers before 5.25). **The peer** every ratio is against;
- ``peft-lily-in``: PEFT's Lily on in_proj, same shape, on stock transformers.

Each arm runs in its own process (its peak memory is its own), one micro-batch shape after another: median
step time of ``--steps`` steps after ``--warmup``, tokens/s, peak CUDA memory. ``--profile`` also profiles one
step per arm at the first shape: CUDA kernels launched, their total time, and host time in lily-ssm's regions.

Decoding (``--decode``): batch 8, a 128-token prompt, 64 new tokens, greedy, with the cache, for lily-ssm Lily,
lily-ssm LoRA, stock + PEFT LoRA (the peer) and stock alone; new tokens/s and the fraction of the
memory-bandwidth floor (the bytes of weights one step reads, at ``--bandwidth`` GB/s).

The projected epoch is the paper's Falcon-Mamba-7B Lily run: ``--epoch-tokens`` Commonsense170K tokens through 64
layers, from step times measured at two depths (``--layers`` and half of it) extrapolated linearly in depth,
at the micro-batch with the most tokens/s.

    python eval/bench/gpu_step.py [--out gpu-check] [--layers 8] [--shapes 4x256,4x2048] [--decode] [--profile]

Writes ``gpu_step.json`` and ``gpu_step.md`` into ``--out``. ``--device cpu --hidden 64 --inner 128 --dt-rank 8
--vocab 256 --shapes 2x16`` runs the same code tiny on a CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TRAIN_ARMS = {"lily-in": "lily-ssm Lily, in_proj", "lily-dt-in": "lily-ssm Lily, in_proj + dt_proj",
              "lora-in": "lily-ssm LoRA r8, in_proj", "peft-lora-in": "PEFT LoRA r8, in_proj, stock (peer)",
              "peft-lily-in": "PEFT Lily, in_proj, stock"}
PEER = "peft-lora-in"
DECODE_ARMS = {"lily": "lily-ssm Lily, in_proj", "lora": "lily-ssm LoRA r8, in_proj",
               "peft-lora": "PEFT LoRA r8, stock (peer)", "stock": "stock, no adapter",
               "lily-graphed": "lily-ssm Lily, in_proj, decode step in a CUDA graph"}
DECODE_PEER = "peft-lora"
# lily-ssm functions whose host time the profile reports (module path, attribute path)
REGIONS = [("lily_ssm.tuners.base", "AdaptedLinear.forward"), ("lily_ssm.tuners.lily.layer", "mix_weights"),
           ("lily_ssm.tuners.liveness", "LivenessCheck.before"), ("lily_ssm.tuners.liveness", "LivenessCheck.after"),
           ("lily_ssm.tuners.routing", "_RoutingHooks.before"), ("lily_ssm.modules.mamba_mixer", "mamba_mixer_forward"),
           ("lily_ssm.modules.recompute", "_FusedScan.backward")]


def build_model(spec: dict, layers: int):
    import torch
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    config = FalconMambaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inner"],
                               num_hidden_layers=layers, state_size=16, time_step_rank=spec["dt_rank"], conv_kernel=4,
                               tie_word_embeddings=False, use_cache=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:  # initialised where it runs: a billion parameters initialise slowly on a CPU
        return FalconMambaForCausalLM(config).to(dtype)


def adapt(model, arm: str, layers: int):
    """``model`` with ``arm``'s adapter (and, for lily-ssm arms, lily-ssm's mixers)."""
    num_A = min(4, layers)  # the paper's 4 A experts
    if arm.startswith("peft") or arm == "stock":
        if arm == "stock":
            return model
        from peft import LilyConfig, LoraConfig, get_peft_model

        if "lily" in arm:
            config = LilyConfig(r=40, stride_A=-(-layers // num_A), num_B=4, target_modules=["in_proj"])
        else:
            config = LoraConfig(r=8, lora_alpha=16, target_modules=["in_proj"])
        return get_peft_model(model, config)
    import lily_ssm

    if arm.startswith("lora"):
        return lily_ssm.apply_adapter(model, lily_ssm.LoraConfig(["in_proj"], r=8, alpha=16))
    dt = "dt" in arm
    return lily_ssm.apply_adapter(model, lily_ssm.LilyConfig(["in_proj", "dt_proj"] if dt else ["in_proj"], r=40,
                                                             num_A=num_A, num_B=4, routing="causal",
                                                             overrides={"dt_proj": {"r": 12}} if dt else {}))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _wrap_regions():
    """Label lily-ssm's host-side regions for the profiler (this process only)."""
    import importlib

    import torch

    for module_name, path in REGIONS:
        try:
            owner = importlib.import_module(module_name)
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = getattr(owner, name)
        except (ImportError, AttributeError):  # an older lily-ssm (the profile before a change) may lack it
            continue

        def wrapped(*args, _original=original, _label=path, **kwargs):
            with torch.profiler.record_function(f"lily::{_label}"):
                return _original(*args, **kwargs)

        setattr(owner, name, wrapped)


def profile_step(step, device) -> dict:
    """Kernels launched by one step, their summed time, the step's wall time, and host ms per labelled region."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    wall = time.perf_counter() - start
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    regions: dict[str, float] = {}
    for e in events:
        if e.name.startswith("lily::"):
            regions[e.name[6:]] = regions.get(e.name[6:], 0.0) + e.cpu_time_total / 1e3
    aten = sum(1 for e in events if e.name.startswith("aten::") and e.device_type != torch.autograd.DeviceType.CUDA)
    top = sorted(((e.key, e.count, e.self_device_time_total / 1e3 if device.type == "cuda" else e.self_cpu_time_total
                   / 1e3) for e in prof.key_averages()), key=lambda r: -r[2])[:12]
    return {"kernels": len(kernels), "kernel_ms": sum(e.device_time_total for e in kernels) / 1e3 if kernels else None,
            "wall_ms": wall * 1e3, "aten_ops": aten, "regions_ms": {k: round(v, 2) for k, v in regions.items()},
            "top": [[k, c, round(t, 3)] for k, c, t in top]}


def train_worker(spec: dict) -> dict:
    import torch

    device = torch.device(spec["device"])
    if spec.get("profile"):
        _wrap_regions()
    model = adapt(build_model(spec, spec["layers"]), spec["arm"], spec["layers"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    result: dict = {"trainable": sum(p.numel() for p in params), "shapes": {}}
    for shape in spec["shapes"]:
        batch, tokens = (int(v) for v in shape.split("x"))
        ids = torch.randint(2, spec["vocab"], (batch, tokens), device=device)

        def step(ids=ids) -> None:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            for _ in range(spec["warmup"]):
                step()
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(spec["steps"]):
                start = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            result["shapes"][shape] = {"error": "out of memory"}
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        median = statistics.median(times)
        entry = {"median_s": median, "tokens_per_s": batch * tokens / median}
        if device.type == "cuda":
            entry["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if spec.get("profile") and shape == spec["shapes"][0]:
            entry["profile"] = profile_step(step, device)
        result["shapes"][shape] = entry
    return result


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_worker(spec: dict) -> dict:
    import torch

    device = torch.device(spec["device"])
    graphed = spec["arm"].endswith("-graphed")
    model = adapt(build_model(spec, spec["layers"]), spec["arm"].removesuffix("-graphed"), spec["layers"])
    model.eval()
    batch, prompt, new = spec["decode_batch"], spec["decode_prompt"], spec["decode_new"]
    ids = torch.randint(2, spec["vocab"], (batch, prompt), device=device)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0,
                  eos_token_id=None)
    if graphed:
        from lily_ssm.evaluation.decoding import greedy_decode

        def generate(max_new: int):
            return greedy_decode(model, ids, max_new, graph=device.type == "cuda")
    else:
        def generate(max_new: int):
            return model.generate(ids, **{**kwargs, "max_new_tokens": max_new, "min_new_tokens": max_new})
    with torch.no_grad():
        generate(4)  # warm-up
        _sync(device)
        times = []
        for _ in range(spec["decode_repeats"]):
            start = time.perf_counter()
            out = generate(new)
            _sync(device)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()  # the prompt alone, to take it out of the per-token time
        model(input_ids=ids, use_cache=True)
        _sync(device)
        prefill = time.perf_counter() - start
    total = statistics.median(times)
    per_step = max(total - prefill, 1e-9) / new
    floor = weight_bytes(model) / (spec["bandwidth"] * 1e9)
    assert out.shape[1] == prompt + new
    return {"new_tokens_per_s": batch * new / total, "ms_per_step": per_step * 1e3, "floor_ms": floor * 1e3,
            "floor_fraction": floor / per_step, "weights_gb": weight_bytes(model) / 1e9}


def worker(spec: dict) -> None:
    try:
        common.emit(decode_worker(spec) if spec["kind"] == "decode" else train_worker(spec))
    except ImportError as exc:
        common.emit({"skipped": f"{type(exc).__name__}: {exc}"})


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arms", default=",".join(TRAIN_ARMS), help="training arms, comma-separated")
    parser.add_argument("--shapes", default="4x256,4x2048", help="micro-batches batch x tokens, comma-separated")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inner", type=int, default=8192)
    parser.add_argument("--dt-rank", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=65024)
    parser.add_argument("--profile", action="store_true", help="profile one step per arm at the first shape")
    parser.add_argument("--decode", action="store_true", help="also time cached decoding")
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--decode-prompt", type=int, default=128)
    parser.add_argument("--decode-new", type=int, default=64)
    parser.add_argument("--decode-repeats", type=int, default=3)
    parser.add_argument("--bandwidth", type=float, default=4300.0, help="memory bandwidth in GB/s (H200: ~4300)")
    parser.add_argument("--epoch-tokens", type=float, default=25e6, help="tokens of one Commonsense170K epoch")
    parser.add_argument("--no-projection", action="store_true", help="skip the half-depth run of the projection")
    args = parser.parse_args()
    base = {k: getattr(args, k) for k in ("device", "steps", "warmup", "layers", "hidden", "inner", "dt_rank", "vocab",
                                          "decode_batch", "decode_prompt", "decode_new", "decode_repeats",
                                          "bandwidth")}
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    results: dict = {"train": {}, "decode": {}, "settings": {**base, "shapes": shapes}}
    for arm in arms:
        print(f"  training {arm} ...", file=sys.stderr, flush=True)
        results["train"][arm] = common.run_arm(__file__, {**base, "kind": "train", "arm": arm, "shapes": shapes,
                                                          "profile": args.profile}, os.cpu_count() or 1)
    if not args.no_projection and "lily-in" in arms:
        half = max(1, args.layers // 2)
        print(f"  training lily-in at {half} layers (for the projection) ...", file=sys.stderr, flush=True)
        results["train_half"] = common.run_arm(__file__, {**base, "kind": "train", "arm": "lily-in", "shapes": shapes,
                                                          "layers": half}, os.cpu_count() or 1)
    if args.decode:
        for arm in DECODE_ARMS:
            print(f"  decoding {arm} ...", file=sys.stderr, flush=True)
            results["decode"][arm] = common.run_arm(__file__, {**base, "kind": "decode", "arm": arm},
                                                    os.cpu_count() or 1)
    report = render(results, args)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_step.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "gpu_step.md").write_text(report + "\n")


def render(results: dict, args: argparse.Namespace) -> str:
    lines = [f"{args.layers}-layer Falcon-Mamba, d_model {args.hidden}, d_inner {args.inner}, bf16 on {args.device}; "
             f"train step = forward + backward + AdamW (median of {args.steps}); ratios against {TRAIN_ARMS[PEER]}", ""]
    peer = results["train"].get(PEER, {}).get("shapes", {})
    header = "| arm | micro-batch | trainable | tokens/s | speed vs peer | peak GiB | memory vs peer |"
    lines += [header, "|---|---|---:|---:|---:|---:|---:|"]
    for arm, result in results["train"].items():
        if "shapes" not in result:
            lines.append(f"| {TRAIN_ARMS[arm]} | - | - | {result.get('error') or result.get('skipped')} | | | |")
            continue
        for shape, r in result["shapes"].items():
            p = peer.get(shape, {})
            speed = _fmt(r["tokens_per_s"] / p["tokens_per_s"], ".2f") if "tokens_per_s" in r and "tokens_per_s" in p \
                else "-"
            memory = _fmt(r["peak_gib"] / p["peak_gib"], ".2f") if "peak_gib" in r and "peak_gib" in p else "-"
            lines.append(f"| {TRAIN_ARMS[arm]} | {shape} | {result['trainable']:,} | "
                         f"{_fmt(r.get('tokens_per_s'), ',.0f') if 'error' not in r else r['error']} | {speed} | "
                         f"{_fmt(r.get('peak_gib'), '.2f')} | {memory} |")
    lily, dt = results["train"].get("lily-in", {}).get("shapes", {}), results["train"].get("lily-dt-in", {}).get(
        "shapes", {})
    for shape in lily:
        if "median_s" in lily[shape] and "median_s" in dt.get(shape, {}):
            lines.append(f"\nLily in_proj + dt_proj costs {dt[shape]['median_s'] / lily[shape]['median_s']:.2f}x the "
                         f"step time of Lily on in_proj at {shape}.")
    profiles = {arm: r["shapes"][s]["profile"] for arm, r in results["train"].items() for s in r.get("shapes", {})
                if "profile" in r["shapes"][s]}
    if profiles:
        lines += ["", "| arm (one step, first shape) | CUDA kernels | kernel ms | wall ms | aten ops | host ms in "
                  "lily-ssm regions |", "|---|---:|---:|---:|---:|---|"]
        for arm, p in profiles.items():
            regions = ", ".join(f"{k} {v}" for k, v in p["regions_ms"].items()) or "-"
            lines.append(f"| {TRAIN_ARMS[arm]} | {p['kernels']} | {_fmt(p['kernel_ms'], '.1f')} | {p['wall_ms']:.1f} "
                         f"| {p['aten_ops']} | {regions} |")
    projection = _projection(results, args)
    if projection:
        lines += ["", projection]
    if results["decode"]:
        lines += ["", f"Cached decoding: batch {args.decode_batch}, prompt {args.decode_prompt}, {args.decode_new} new "
                      f"tokens, greedy; floor = weights read per step at {args.bandwidth:.0f} GB/s", "",
                  "| arm | new tokens/s | vs peer | ms per step | floor ms | fraction of floor |",
                  "|---|---:|---:|---:|---:|---:|"]
        peer_decode = results["decode"].get(DECODE_PEER, {})
        for arm, r in results["decode"].items():
            if "new_tokens_per_s" not in r:
                lines.append(f"| {DECODE_ARMS[arm]} | {r.get('error') or r.get('skipped')} | | | | |")
                continue
            ratio = _fmt(r["new_tokens_per_s"] / peer_decode["new_tokens_per_s"], ".2f") \
                if "new_tokens_per_s" in peer_decode else "-"
            lines.append(f"| {DECODE_ARMS[arm]} | {r['new_tokens_per_s']:,.0f} | {ratio} | {r['ms_per_step']:.2f} | "
                         f"{r['floor_ms']:.2f} | {r['floor_fraction']:.2f} |")
    return "\n".join(lines)


def _projection(results: dict, args: argparse.Namespace) -> str | None:
    """One epoch of the paper's 64-layer Lily run, from step times at two depths (linear in depth)."""
    full = results["train"].get("lily-in", {}).get("shapes", {})
    half = results.get("train_half", {}).get("shapes", {})
    layers, half_layers = args.layers, max(1, args.layers // 2)
    best = None
    for shape, r in full.items():
        h = half.get(shape, {})
        if "median_s" not in r or "median_s" not in h or layers == half_layers:
            continue
        per_layer = (r["median_s"] - h["median_s"]) / (layers - half_layers)
        step64 = r["median_s"] + per_layer * (64 - layers)
        batch, tokens = (int(v) for v in shape.split("x"))
        rate = batch * tokens / step64
        memory = None
        if "peak_gib" in r and "peak_gib" in h:
            memory = r["peak_gib"] + (r["peak_gib"] - h["peak_gib"]) / (layers - half_layers) * (64 - layers)
        if best is None or rate > best[1]:
            best = (shape, rate, memory)
    if best is None:
        return None
    shape, rate, memory = best
    hours = args.epoch_tokens / rate / 3600
    fits = "" if memory is None else f", about {memory:.0f} GiB at 64 layers"
    return (f"Projected epoch of the paper's Falcon-Mamba-7B Lily run ({args.epoch_tokens / 1e6:.0f}M tokens, 64 "
            f"layers) at micro-batch {shape}: {hours:.2f} h ({rate:,.0f} tokens/s{fits}; step time linear in depth "
            f"from {half_layers} and {layers} layers).")


if __name__ == "__main__":
    worker_spec = common.worker_spec()
    worker(worker_spec) if worker_spec else main()

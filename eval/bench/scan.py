"""Selective scan, forward + backward: lily-ssm's chunked scan vs transformers' sequential fallback vs
mambapy's parallel scan (the named peer), batch 4, d_inner 512, d_state 16.

    python eval/bench/scan.py [--lengths 256 1024 4096] [--repeats 3] [--threads 2] [--hf-max-length 1024]

Each arm runs in its own process. Reports the median time, peak memory above the inputs, and the
max abs error of the output against the sequential fp32 oracle (lily_ssm.ops.selective_scan_ref).
transformers' fallback is quadratic in length in backward, so it runs once and only up to
--hf-max-length.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BATCH, DIM, STATE = 4, 512, 16


def make_inputs(length: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "u": torch.randn(BATCH, DIM, length, generator=g),
        "delta": torch.randn(BATCH, DIM, length, generator=g) * 0.5,
        "A": -torch.exp(torch.rand(DIM, STATE, generator=g) * 2),
        "B": torch.randn(BATCH, STATE, length, generator=g),
        "C": torch.randn(BATCH, STATE, length, generator=g),
        "D": torch.randn(DIM, generator=g),
        "z": torch.randn(BATCH, DIM, length, generator=g),
        "delta_bias": torch.randn(DIM, generator=g) * 0.5,
    }


def scan_fn(arm: str):
    import torch
    import torch.nn.functional as F

    if arm == "lily-ssm":
        from lily_ssm.ops import selective_scan_chunked

        def run(x):
            return selective_scan_chunked(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                          x["delta_bias"], True)
    elif arm == "transformers":
        from transformers.models.mamba import modeling_mamba

        def run(x):
            return modeling_mamba.mamba_selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                                       x["delta_bias"], True, use_mambapy=False)
    elif arm == "mambapy":
        from mambapy.pscan import pscan

        def run(x):  # transformers' use_mambapy discretisation, calling pscan directly
            dt = F.softplus(x["delta"] + x["delta_bias"][:, None])
            dA = torch.exp(x["A"][None, :, None, :] * dt[..., None])
            dBu = dt[..., None] * x["B"][:, None].transpose(2, 3) * x["u"][..., None]
            states = pscan(dA.transpose(1, 2), dBu.transpose(1, 2))  # (b, l, d, n)
            y = (states @ x["C"].transpose(1, 2)[..., None]).squeeze(-1).transpose(1, 2)
            return (y + x["u"] * x["D"][:, None]) * F.silu(x["z"])
    else:
        raise ValueError(f"unknown arm {arm!r}")
    return run


def worker(spec: dict) -> None:
    import torch

    from lily_ssm.ops import selective_scan_ref

    torch.manual_seed(0)
    x = make_inputs(spec["length"])
    for v in x.values():
        v.requires_grad_()
    run = scan_fn(spec["arm"])

    def step():
        for v in x.values():
            v.grad = None
        run(x).sum().backward()

    result = common.time_repeated(step, spec["repeats"], spec["warmup"])
    with torch.no_grad():
        oracle = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)
        result["max_abs_err"] = (run(x) - oracle).abs().max().item()
    common.emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-max-length", type=int, default=1024)
    args = parser.parse_args()
    try:
        import mambapy  # noqa: F401
    except ImportError:
        sys.exit("mambapy is the named peer of this benchmark: pip install mambapy")

    rows = []
    for length in args.lengths:
        results = {}
        for arm in ("lily-ssm", "mambapy", "transformers"):
            if arm == "transformers" and length > args.hf_max_length:
                results[arm] = {}
                continue
            slow = arm == "transformers"
            spec = {"arm": arm, "length": length, "repeats": 1 if slow else args.repeats, "warmup": 0 if slow else 1}
            print(f"  running {arm} at length {length} ...", file=sys.stderr, flush=True)
            results[arm] = common.run_arm(__file__, spec, args.threads)
        for arm, res in results.items():
            err = f"{res['max_abs_err']:.1e}" if "max_abs_err" in res else "-"
            rows.append([length, arm, res.get("runs", "-"), common.fmt_s(res), common.fmt_mb(res), err,
                         common.ratio(res, results["mambapy"]), common.ratio(res, results["mambapy"], "peak_mb")])
            if "error" in res:
                print(f"  {arm} at {length}: {res['error']}", file=sys.stderr)
    print(f"\nselective scan fwd+bwd, batch {BATCH}, d_inner {DIM}, d_state {STATE}, {args.threads} threads "
          "(peer: mambapy)")
    common.print_table(["length", "arm", "runs", "median s", "peak MB", "max abs err", "time/peer", "mem/peer"],
                       rows)


if __name__ == "__main__":
    spec = common.worker_spec()
    worker(spec) if spec else main()

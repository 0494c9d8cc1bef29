"""The Mamba-2 (SSD) scan on a CPU, forward + backward: lily-ssm's chunked scan vs transformers' own
PyTorch path (``mamba2_chunk_scan``'s fallback, the named peer), at a Mamba-2-130M-like shape (24 heads of
64, state 128, one group, chunk 256), with the error of each against the sequential oracle.

    python eval/bench/ssd.py [--lengths 512,2048] [--batch 2] [--repeats 5] [--threads 2]

Each arm runs in its own process (peak memory is its own); medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HEADS, HEAD_DIM, STATE, GROUPS, CHUNK = 24, 64, 128, 1, 256
ARMS = ["lily-ssm", "transformers"]


def _inputs(batch: int, length: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, HEADS, HEAD_DIM, generator=g)
    dt = torch.randn(batch, length, HEADS, generator=g) * 0.5
    A = -torch.rand(HEADS, generator=g) * 4 - 0.5
    B = torch.randn(batch, length, GROUPS, STATE, generator=g)
    C = torch.randn(batch, length, GROUPS, STATE, generator=g)
    D, bias = torch.randn(HEADS, generator=g), torch.randn(HEADS, generator=g) * 0.5
    return x, dt, A, B, C, D, bias


def _scan(arm: str):
    if arm == "lily-ssm":
        from lily_ssm.ops.ssd import ssd_chunk_scan

        return ssd_chunk_scan
    import transformers.models.mamba2.modeling_mamba2 as m

    return m.mamba2_chunk_scan


def worker(spec: dict) -> None:
    import torch

    scan = _scan(spec["arm"])
    x, dt, A, B, C, D, bias = _inputs(spec["batch"], spec["length"])
    leaves = [t.requires_grad_() for t in (x, dt, B, C)]

    def step():
        for t in leaves:
            t.grad = None
        y = scan(x, dt, A, B, C, CHUNK, D=D, dt_bias=bias, dt_softplus=True)
        y.float().square().mean().backward()

    result = common.time_repeated(step, spec["repeats"], warmup=1)
    if spec["check"]:  # the error against the sequential oracle, on a shorter input
        from lily_ssm.ops.ssd import ssd_scan_ref

        small = _inputs(1, 300, seed=1)
        with torch.no_grad():
            ref = ssd_scan_ref(*small[:5], CHUNK, D=small[5], dt_bias=small[6], dt_softplus=True)
            got = scan(*small[:5], CHUNK, D=small[5], dt_bias=small[6], dt_softplus=True)
        result["max_error"] = float((got.float() - ref).abs().max())
    common.emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for length in [int(v) for v in args.lengths.split(",")]:
        found = {}
        for arm in ARMS:
            print(f"  running {arm} at length {length} ...", file=sys.stderr, flush=True)
            spec = {"arm": arm, "batch": args.batch, "length": length, "repeats": args.repeats,
                    "check": length == int(args.lengths.split(",")[0])}
            found[arm] = common.run_arm(__file__, spec, args.threads)
        ours, peer = found["lily-ssm"], found["transformers"]
        memory = f"{ours['peak_mb'] / peer['peak_mb']:.2f}" if "peak_mb" in ours and "peak_mb" in peer else "-"
        errors = [f"{r['max_error']:.1e}" if "max_error" in r else "" for r in (ours, peer)]
        rows.append([length, common.fmt_s(ours), f"{ours.get('peak_mb', 0):.0f}", common.fmt_s(peer),
                     f"{peer.get('peak_mb', 0):.0f}", common.ratio(ours, peer), memory, *errors])
    print(f"\nSSD scan fwd+bwd, batch {args.batch}, {HEADS} heads x {HEAD_DIM}, state {STATE}, {GROUPS} group, chunk "
          f"{CHUNK}, {args.threads} threads (peer: transformers' PyTorch path)")
    common.print_table(["length", "lily-ssm s", "MB", "transformers s", "MB", "time/peer", "memory/peer",
                        "lily-ssm err", "transformers err"], rows)


if __name__ == "__main__":
    spec = common.worker_spec()
    worker(spec) if spec else main()

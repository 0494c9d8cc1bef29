"""Shared benchmark plumbing: each arm runs in its own process so peak memory is its own.

A script calls :func:`run_arm` for every (arm, setting); the child process re-runs the same script
with ``--worker`` and a JSON spec, times the workload with :func:`time_repeated`, and prints one JSON
line with the median time and the peak resident memory above the process's baseline.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

WORKER_FLAG = "--worker"
# glibc keeps freed memory for reuse instead of returning it to the OS after every step: the timings then
# measure compute rather than page faults (which moved single runs by up to 30% on a 2-core machine).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
              "MALLOC_TOP_PAD_": str(1 << 30)}


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_repeated(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs, and peak memory above
    the memory in use before the first run (MiB)."""
    baseline = rss_mb()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "runs": len(times), "peak_mb": peak_rss_mb() - baseline}


def run_arm(script: str, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one arm of ``script`` in a fresh process; returns its JSON result (or ``{"error": ...}``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **MALLOC_ENV}
    proc = subprocess.run([sys.executable, script, WORKER_FLAG, json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(lines[-1])


def time_interleaved(steps: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each step function, timed in turns (every step once, then again, ...) so that
    the machine's slow spells fall on every arm alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(found) for name, found in times.items()}


def worker_spec() -> dict[str, Any] | None:
    """The JSON spec when this process is a worker, else None."""
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        return json.loads(sys.argv[2])
    return None


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def fmt_s(result: dict[str, Any]) -> str:
    return "error" if "error" in result else (f"{result['median_s']:.3f}" if "median_s" in result else "skipped")


def fmt_mb(result: dict[str, Any]) -> str:
    return f"{result['peak_mb']:.0f}" if "peak_mb" in result else "-"


def ratio(a: dict[str, Any], b: dict[str, Any], key: str = "median_s") -> str:
    if key in a and key in b and b[key] > 0:
        return f"{a[key] / b[key]:.2f}"
    return "-"

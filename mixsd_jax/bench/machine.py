"""The machine a benchmark ran on, for its JSON line: cores, load before and after, busy or not.

The verdict reads the 1-minute load taken *before* the timed work (at the end the benchmark's own
threads are in it): a machine already above half its cores was not idle, and such timings are not
evidence.
"""

from __future__ import annotations

import os
import sys


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def report(load_before: list[float]) -> dict:
    """{load_avg_before, load_avg (now), cores, cpu_model, cpu_flags (those that decide the matmul
    path), glibc_tunables (malloc's settings: huge_pages)} and `busy` (also printed to stderr) when
    it was busy."""
    from mixsd_jax.cpu import cpu_info
    from mixsd_jax.train.precision import REPORTED_CPU_FLAGS

    n = cores()
    model, flags = cpu_info()
    info = {"load_avg_before": load_before, "load_avg": load(), "cores": n, "cpu_model": model,
            "cpu_flags": [flag for flag in REPORTED_CPU_FLAGS if flag in flags],
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    if load_before[0] > n / 2:
        info["busy"] = f"load {load_before[0]} > cores/2 = {n / 2} before the timed work: timings are not evidence"
        print(f"warning: {info['busy']}", file=sys.stderr)
    return info

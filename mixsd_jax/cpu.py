"""This host's processor as /proc/cpuinfo describes it: its model name and feature flags.

Two choices follow from it: the compute dtype `auto` picks on a CPU (train.precision: bf16 where
AMX or AVX512-BF16 runs bf16 matmuls) and the compilation cache's folder (compile_cache: XLA:CPU
compiles for the host's instruction set). Benchmark lines report it (bench.machine).
"""

from __future__ import annotations

import functools


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo-format text (x86 `flags`, Arm
    `Features`): a host's cores are one kind."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(model name, flags) from a cpuinfo file; ("", {}) where there is none (not Linux)."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return "", frozenset()


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of this machine's CPU."""
    return read_cpuinfo()

"""The compute dtype `auto` stands for, from the platform and, on a CPU, its instruction set.

bf16 compute (with f32 master weights and optimizer state) is the fast choice on TPUs and GPUs,
and on CPUs with AMX, where XLA:CPU's library path runs bf16 matmuls on the AMX tiles
(models.matmul; docs/benchmarks.md). A CPU with AVX512-BF16 but no AMX has bf16 dot-product
instructions too, but bf16 was not measured faster there yet, so `auto` keeps f32 on it; other
CPUs emulate bf16 arithmetic, slower than f32.
"""

from __future__ import annotations

import functools

BF16_CPU_FLAGS = ("amx_bf16",)
# The CPU flags a benchmark line reports: what decides the matmul path and its speed.
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of this machine's CPU from /proc/cpuinfo; ("", {}) where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return "", frozenset()


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo-format text."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_has_bf16_matmul(flags: frozenset[str] | None = None) -> bool:
    return bool(set(BF16_CPU_FLAGS) & (cpu_info()[1] if flags is None else flags))


def resolve_compute_dtype(name: str, platform: str, flags: frozenset[str] | None = None) -> str:
    """`name` itself unless it is "auto": then bfloat16 on accelerators and on CPUs with AMX,
    float32 on other CPUs."""
    if name != "auto":
        return name
    if platform != "cpu" or cpu_has_bf16_matmul(flags):
        return "bfloat16"
    return "float32"

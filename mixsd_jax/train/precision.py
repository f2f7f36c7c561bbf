"""The compute dtype `auto` stands for, from the platform and, on a CPU, its instruction set.

bf16 compute (with f32 master weights and optimizer state) is the fast choice on TPUs and GPUs,
and on CPUs with bf16 matmul instructions, where XLA:CPU's library path (models.matmul) runs bf16
matmuls on AMX tiles or AVX512-BF16 dot products. Measured (docs/benchmarks.md): the SmolLM2 train
step 2.1-2.9x faster in bf16 than in f32 on an AMD EPYC with AVX512-BF16 and no AMX, and 1.9x on
an Intel Xeon with AMX. Other CPUs emulate bf16 arithmetic, slower than f32, so `auto` keeps f32 there.
"""

from __future__ import annotations

from mixsd_jax.cpu import cpu_info

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# The CPU flags a benchmark line reports: what decides the matmul path and its speed.
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")


def cpu_has_bf16_matmul(flags: frozenset[str] | None = None) -> bool:
    return bool(set(BF16_CPU_FLAGS) & (cpu_info()[1] if flags is None else flags))


def resolve_compute_dtype(name: str, platform: str, flags: frozenset[str] | None = None) -> str:
    """`name` itself unless it is "auto": then bfloat16 on accelerators and on CPUs with AMX or
    AVX512-BF16, float32 on other CPUs."""
    if name != "auto":
        return name
    if platform != "cpu" or cpu_has_bf16_matmul(flags):
        return "bfloat16"
    return "float32"

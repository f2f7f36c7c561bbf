"""train.precision: what `compute_dtype: auto` resolves to."""

from pathlib import Path

from mixsd_jax.train.config import TrainConfig
from mixsd_jax.cpu import cpu_info, parse_cpuinfo
from mixsd_jax.train.precision import resolve_compute_dtype


def test_auto_is_bf16_on_accelerators_and_on_cpus_with_bf16_matmuls():
    assert resolve_compute_dtype("auto", "tpu", frozenset()) == "bfloat16"
    assert resolve_compute_dtype("auto", "gpu", frozenset()) == "bfloat16"
    assert resolve_compute_dtype("auto", "cpu", frozenset({"avx512f", "amx_bf16", "amx_tile"})) == "bfloat16"
    # AVX512-BF16 without AMX (AMD Zen 4 and later): measured 2.1-2.9x f32's train step.
    assert resolve_compute_dtype("auto", "cpu", frozenset({"avx512f", "avx512_bf16"})) == "bfloat16"
    # No bf16 instructions: bf16 arithmetic is emulated.
    assert resolve_compute_dtype("auto", "cpu", frozenset({"avx2", "avx512f"})) == "float32"


def test_an_explicit_dtype_is_kept_whatever_the_machine():
    assert resolve_compute_dtype("float32", "tpu", frozenset()) == "float32"
    assert resolve_compute_dtype("bfloat16", "cpu", frozenset({"avx2"})) == "bfloat16"


def test_the_amx_xeon_of_the_benchmarks_resolves_auto_to_bf16():
    """Real /proc/cpuinfo text of the AMX Xeon that docs/benchmarks.md measured bf16 faster on;
    without its AMX flags it still has AVX512-BF16 (bf16), without both it keeps f32."""
    text = (Path(__file__).parent / "fixtures" / "cpuinfo_xeon_amx.txt").read_text()
    model, flags = parse_cpuinfo(text)
    assert model == "Intel(R) Xeon(R) Processor"
    assert {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f"} <= flags
    assert resolve_compute_dtype("auto", "cpu", flags) == "bfloat16"
    without_amx = frozenset(f for f in flags if not f.startswith("amx"))
    assert resolve_compute_dtype("auto", "cpu", without_amx) == "bfloat16"
    assert resolve_compute_dtype("auto", "cpu", without_amx - {"avx512_bf16"}) == "float32"


def test_train_config_resolves_auto_per_platform():
    cfg = TrainConfig(compute_dtype="auto")
    assert cfg.compute_dtype_on("tpu") == "bfloat16"
    assert cfg.compute_dtype_on("cpu") == resolve_compute_dtype("auto", "cpu", cpu_info()[1])
    assert TrainConfig().compute_dtype_on("tpu") == "float32"  # the default stays f32 everywhere

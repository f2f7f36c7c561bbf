"""train.precision: what `compute_dtype: auto` resolves to, and this machine's CPU description."""

from mixsd_jax.train.precision import cpu_info, resolve_compute_dtype


def test_auto_is_bf16_on_accelerators_and_on_cpus_with_amx():
    assert resolve_compute_dtype("auto", "tpu", frozenset()) == "bfloat16"
    assert resolve_compute_dtype("auto", "gpu", frozenset()) == "bfloat16"
    assert resolve_compute_dtype("auto", "cpu", frozenset({"avx512f", "amx_bf16", "amx_tile"})) == "bfloat16"
    # AVX512-BF16 without AMX: bf16 not measured faster there.
    assert resolve_compute_dtype("auto", "cpu", frozenset({"avx512f", "avx512_bf16"})) == "float32"
    assert resolve_compute_dtype("auto", "cpu", frozenset({"avx2", "avx512f"})) == "float32"


def test_an_explicit_dtype_is_kept_whatever_the_machine():
    assert resolve_compute_dtype("float32", "tpu", frozenset()) == "float32"
    assert resolve_compute_dtype("bfloat16", "cpu", frozenset({"avx2"})) == "bfloat16"


def test_cpu_info_reads_this_linux_machine():
    model, flags = cpu_info()
    with open("/proc/cpuinfo") as f:
        text = f.read()
    assert model and model in text
    assert flags and all(flag in text for flag in flags)

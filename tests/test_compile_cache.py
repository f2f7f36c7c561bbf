"""The persistent compilation cache is kept per processor kind, wherever it lives."""

from mixsd_jax import compile_cache
from mixsd_jax.storage import StorageConfig

XEON = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\n"
ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx512f avx512_bf16\n\n"


def test_the_fingerprint_follows_the_processor_model_and_flags_not_the_core_count(tmp_path):
    def fingerprint(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return compile_cache.host_fingerprint(str(path))

    xeon = fingerprint(XEON)
    assert xeon.startswith("cpu-") and len(xeon) == len("cpu-") + 12
    assert fingerprint(XEON.replace("processor\t: 0", "processor\t: 1") + XEON) == xeon  # a second core alike
    assert fingerprint(ZEN4) != xeon
    assert fingerprint(XEON.replace(" amx_bf16 amx_tile", "")) != xeon  # same model name, no AMX


def test_every_cache_location_ends_in_this_hosts_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path))
    here = compile_cache.host_fingerprint()
    assert compile_cache.cache_location() == str(tmp_path / "xla" / here)
    assert compile_cache.cache_location(StorageConfig(compile_cache_dir=str(tmp_path / "shared"))) == \
        str(tmp_path / "shared" / here)
    assert compile_cache.cache_location(out_dir="gs://bkt/run") == f"gs://bkt/run/.jax_cache/{here}"

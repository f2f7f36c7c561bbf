"""XLA's persistent compilation cache for the commands that compile big kernels.

Generation, training and evaluation compile the same kernels again and again (every training run,
every evaluated checkpoint, every rerun, every pipeline stage): keeping the compiled programs on
disk compiles each once per machine. On a pod JAX writes the cache from process 0 only, so a cache
on each host's own disk leaves every other host compiling every run: a run whose directory is a
bucket keeps its cache there too (`<out_dir>/.jax_cache`, or `storage.compile_cache_dir`).
MIXSD_XLA_CACHE=0 turns it off; a JAX cache directory the user configured
(JAX_COMPILATION_CACHE_DIR) is kept.

Every cache sits in a subfolder named by the host's processor (`cpu-<hash>`): XLA:CPU compiles
for the instruction set of the machine it runs on, and JAX's cache key does not say which (its
platform version is just "cpu"). A program compiled on a Xeon with AMX and read back from a shared
home directory or bucket on an AMD host without AMX may use instructions that host lacks; a
subfolder per processor kind makes that host compile its own.
"""

from __future__ import annotations

import hashlib
import os
import platform

from mixsd_jax.cpu import read_cpuinfo


def host_fingerprint(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """`cpu-<12 hex>` from the processor's model and feature flags (Linux), else its architecture."""
    model, flags = read_cpuinfo(cpuinfo_path)
    ident = f"{platform.machine()} {platform.processor()} {model} {' '.join(sorted(flags))}"
    return "cpu-" + hashlib.sha256(ident.encode()).hexdigest()[:12]


def cache_location(storage_cfg=None, out_dir: str | None = None) -> str:
    from mixsd_jax import storage

    if storage_cfg is not None and storage_cfg.compile_cache_dir:
        base = storage.path(storage_cfg.compile_cache_dir)
    elif out_dir and storage.is_url(out_dir):
        base = storage.path(out_dir) / ".jax_cache"
    else:
        from mixsd_jax.files import cache_dir

        base = cache_dir() / "xla"
    return str(base / host_fingerprint())


def enable(storage_cfg=None, out_dir: str | None = None) -> None:
    if os.environ.get("MIXSD_XLA_CACHE", "1") == "0":
        return
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    location = cache_location(storage_cfg, out_dir)
    if "://" in location:
        from mixsd_jax import storage

        explicit = storage_cfg is not None and storage_cfg.compile_cache_dir
        storage.check_reachable(location, "storage.compile_cache_dir" if explicit else "out_dir")
    jax.config.update("jax_compilation_cache_dir", location)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)

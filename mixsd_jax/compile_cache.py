"""XLA's persistent compilation cache for the commands that compile big kernels.

Generation, training and evaluation compile the same kernels again and again (every training run,
every evaluated checkpoint, every rerun, every pipeline stage): keeping the compiled programs on
disk compiles each once per machine. On a pod JAX writes the cache from process 0 only, so a cache
on each host's own disk leaves every other host compiling every run: a run whose directory is a
bucket keeps its cache there too (`<out_dir>/.jax_cache`, or `storage.compile_cache_dir`).
MIXSD_XLA_CACHE=0 turns it off; a JAX cache directory the user configured
(JAX_COMPILATION_CACHE_DIR) is kept.
"""

from __future__ import annotations

import os


def cache_location(storage_cfg=None, out_dir: str | None = None) -> str:
    from mixsd_jax import storage

    if storage_cfg is not None and storage_cfg.compile_cache_dir:
        return str(storage.path(storage_cfg.compile_cache_dir))
    if out_dir and storage.is_url(out_dir):
        return str(storage.path(out_dir) / ".jax_cache")
    from mixsd_jax.files import cache_dir

    return str(cache_dir() / "xla")


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

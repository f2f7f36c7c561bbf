"""XLA's persistent compilation cache for the commands that compile big kernels.

Generation, training and evaluation compile the same kernels again and again (every training run,
every evaluated checkpoint, every rerun, every pipeline stage): keeping the compiled programs on
disk compiles each once per machine. MIXSD_XLA_CACHE=0 turns it off; a JAX cache directory the
user configured (JAX_COMPILATION_CACHE_DIR) is kept.
"""

from __future__ import annotations

import os


def enable() -> None:
    if os.environ.get("MIXSD_XLA_CACHE", "1") == "0":
        return
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    from mixsd_jax.files import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)

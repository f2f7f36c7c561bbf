"""TPU slices that exist only as a description: XLA:TPU compiles for them on any host with libtpu.

`topology_devices("v5e:4x8")` returns the 32 devices of a v5e-32 slice (8 hosts) from libtpu's
compile-only client; a mesh of them (models.sharding.make_mesh, the run's own function) lets
`jax.jit(...).lower(abstract args).compile()` run the real TPU compiler with no TPU attached.
Nothing can be put on these devices: every input is a `jax.ShapeDtypeStruct`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import sys

from mixsd_jax.errors import MixsdError

_NAME = re.compile(r"v\d+[a-z]*:\d+x\d+(x\d+)?")


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


@functools.lru_cache(maxsize=None)
def topology_devices(name: str) -> tuple:
    """The devices of TPU topology `name` (`v5e:2x4`, `v4:2x2x1`, `v5p:4x4x4`, `v6e:8x8`, ...)."""
    if not _NAME.fullmatch(name):
        raise MixsdError(f"--topology {name!r}: expected a TPU topology such as v5e:2x4, v5e:4x8, v4:2x2x1, "
                         "v5p:4x4x4 or v6e:8x8 (TYPE:AxB[xC])")
    if not has_libtpu():
        raise MixsdError(f"--topology {name}: compiling for a TPU needs libtpu; install the [tpu] extra "
                         "(pip install -e '.[tpu]')")
    # A compile-only client holds no chip: several planning processes (a test run, other users)
    # may load libtpu at once without its single-process lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        with _quiet_stderr():  # libtpu's start-up warnings about TPU hostnames a planning host has not got
            return tuple(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as exc:  # libtpu raises JaxRuntimeError / ValueError with a multi-line trace
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MixsdError(f"--topology {name!r}: libtpu does not know this slice ({first})") from None


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for a while (libtpu writes from C++, past sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def no_persistent_cache():
    """XLA's persistent compilation cache off while compiling for a compile-only TPU client: such a
    client cannot load a serialized executable (every cache hit would warn and compile anyway), and
    a plan's executables are never run, so writing them would only fill the cache. JAX decides once
    per process whether the cache is used, so the decision is reset on the way in and out."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def processes(devices) -> int:
    return len({d.process_index for d in devices})

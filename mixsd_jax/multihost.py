"""Multi-host runs: start-up, moving host data onto the global mesh and back, and who writes files.

Start-up: one process per host joins the others before JAX touches a device.

Sources, first match wins: the config's `distributed` section, the environment
(`MIXSD_COORDINATOR=host:port`, `MIXSD_NUM_PROCESSES`, `MIXSD_PROCESS_ID`), and
`distributed.auto` / `MIXSD_DISTRIBUTED=auto`, which lets JAX detect the cluster itself (TPU pod
slices, SLURM, Open MPI). With none of them the run is single-process and nothing is called.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

import numpy as np

from mixsd_jax import peer_watch
from mixsd_jax.errors import MixsdError

ENV_COORDINATOR = "MIXSD_COORDINATOR"
ENV_NUM_PROCESSES = "MIXSD_NUM_PROCESSES"
ENV_PROCESS_ID = "MIXSD_PROCESS_ID"
ENV_AUTO = "MIXSD_DISTRIBUTED"
ENV_TIMEOUT = "MIXSD_INIT_TIMEOUT"
ENV_HEARTBEAT = "MIXSD_HEARTBEAT_TIMEOUT"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How processes of a multi-host run find each other; unset fields come from the environment
    (MIXSD_COORDINATOR, MIXSD_NUM_PROCESSES, MIXSD_PROCESS_ID) or JAX's cluster auto-detection."""

    coordinator: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # call jax.distributed.initialize() with no arguments (TPU pods, SLURM)
    timeout_s: int | None = None  # how long to wait for the other processes (MIXSD_INIT_TIMEOUT; JAX: 300)


def resolve(cfg: DistributedConfig | None = None, environ=None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process."""
    cfg = cfg or DistributedConfig()
    environ = os.environ if environ is None else environ
    coordinator = cfg.coordinator or environ.get(ENV_COORDINATOR) or None
    num_processes = cfg.num_processes if cfg.num_processes is not None else _env_int(environ, ENV_NUM_PROCESSES)
    process_id = cfg.process_id if cfg.process_id is not None else _env_int(environ, ENV_PROCESS_ID)
    if coordinator is None and num_processes is None and process_id is None:
        if cfg.auto or environ.get(ENV_AUTO, "").lower() in ("1", "auto", "true"):
            return {}
        return None
    settings = ((ENV_COORDINATOR, coordinator), (ENV_NUM_PROCESSES, num_processes), (ENV_PROCESS_ID, process_id))
    missing = [name for name, value in settings if value is None]
    if missing:
        raise MixsdError(
            f"multi-host setup is incomplete: {', '.join(missing)} not set (set all of {ENV_COORDINATOR}, "
            f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}, or the config keys distributed.coordinator/num_processes/process_id)"
        )
    if ":" not in coordinator:
        raise MixsdError(f"{ENV_COORDINATOR}/distributed.coordinator {coordinator!r}: expected host:port")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise MixsdError(f"process id {process_id} is outside [0, {num_processes}) processes")
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


def _env_int(environ, name: str) -> int | None:
    raw = environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise MixsdError(f"environment variable {name}={raw!r}: expected an integer") from None


def maybe_initialize(cfg: DistributedConfig | None = None) -> bool:
    """Join the multi-host run if one is configured; True when JAX runs distributed afterwards."""
    import jax

    if jax.distributed.is_initialized():
        return True
    kwargs = resolve(cfg)
    if kwargs is None:
        return False
    timeout = (cfg.timeout_s if cfg is not None and cfg.timeout_s is not None
               else _env_int(os.environ, ENV_TIMEOUT))
    if timeout is not None:
        kwargs = {**kwargs, "initialization_timeout": timeout}
    # A host that dies without a word (killed, out of memory) is noticed by the others after the
    # heartbeat timeout (JAX's default is 100 s of a slice billed for nothing). Our own watch
    # (`peer_watch`) names the silent host and exits cleanly; JAX's, which aborts the process with a
    # fatal log, is the backstop a little later.
    heartbeat = heartbeat_timeout()
    kwargs = {**kwargs, "heartbeat_timeout_seconds": 2 * heartbeat + 10, "shutdown_timeout_seconds": heartbeat}
    if kwargs.get("process_id"):
        # JAX aborts the whole process (a C++ fatal log, no exception) when it cannot reach the
        # coordinator: look for it first, so an unreachable one is a one-line error instead.
        _wait_for_coordinator(kwargs["coordinator_address"], 300 if timeout is None else timeout)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as exc:  # an unreachable coordinator, a port in use, a cluster JAX cannot detect
        where = kwargs.get("coordinator_address", "auto-detected cluster")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MixsdError(
            f"could not join the multi-host run ({ENV_COORDINATOR}/distributed.coordinator {where}): {first[:300]}"
        ) from None
    peer_watch.start(heartbeat)
    return True


def heartbeat_timeout() -> int:
    """Seconds of silence after which a process counts as dead (MIXSD_HEARTBEAT_TIMEOUT, 30)."""
    return _env_int(os.environ, ENV_HEARTBEAT) or 30


def join_writing_to(cfg: DistributedConfig | None, out_dir: str, key: str, shared_local: bool) -> bool:
    """`maybe_initialize`, for a command writing `out_dir`: a directory the hosts cannot all see
    (a relative local path with several processes) or a bucket that cannot be reached is a
    one-line error naming `key`, checked before joining when the process count is configured (no
    host then waits for the others) and again once JAX knows it (auto-detected clusters)."""
    from mixsd_jax import storage

    planned = (resolve(cfg) or {}).get("num_processes") or 1
    storage.check_out_dir(out_dir, key, planned, shared_local)
    joined = maybe_initialize(cfg)
    storage.check_out_dir(out_dir, key, process_count(), shared_local)
    storage.check_reachable(out_dir, key)
    return joined


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except (OSError, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise MixsdError(
                    f"{ENV_COORDINATOR}/distributed.coordinator {address}: no coordinator reachable after "
                    f"{timeout_s:g}s ({exc}); start process 0 there, or fix the address ({ENV_TIMEOUT} sets the wait)"
                ) from None
            time.sleep(0.5)


# ----------------------------------------------------------------------------- data on the mesh
#
# One convention for every stage: each process runs the same host-side logic on the same inputs
# (work queues, verifiers, retries are deterministic), so every process holds the *whole* host
# batch. `put_global` turns that host copy into one global array (each process supplies only the
# shards its own devices hold), `fetch` brings a global result back whole to every process, and
# only the primary process (index 0) writes files. Bytes on disk therefore never depend on the
# process count.


def is_primary() -> bool:
    """True in the process that writes output files (process 0; the only one when single-process)."""
    import jax

    return jax.process_index() == 0


def put_global(x, sharding):
    """A global array on `sharding` from a host array that every process holds in full."""
    import jax

    x = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def process_count() -> int:
    import jax

    return jax.process_count()


def barrier(name: str) -> None:
    """Every process waits here until all arrive (a no-op for one process). Used after process 0
    writes a file the others read next, e.g. a stage's output before the next stage."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(name: str, value: str) -> None:
    """Check that every process computed the same `value` (e.g. the digest of a resume state read
    from disk); a process that sees other files (no shared filesystem, a stale cache) is an error
    here instead of a hang in the next collective or a silently different output."""
    import hashlib

    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], np.int32).copy()
    every = np.asarray(multihost_utils.process_allgather(digest))
    if not (every == every[0]).all():
        odd = int(next(i for i in range(len(every)) if not (every[i] == every[0]).all()))
        raise MixsdError(
            f"{name}: process {odd} sees other inputs than process 0; every host must read the same files "
            "(put inputs and outputs on a filesystem all hosts share)"
        )


def fetch(tree):
    """Whole numpy copies, on every process, of a pytree of (possibly multi-host) arrays."""
    import jax

    if jax.process_count() == 1 or all(
        getattr(a, "is_fully_addressable", True) for a in jax.tree.leaves(tree)
    ):
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def broadcast_json(value, name: str = "broadcast"):
    """Process 0's JSON-able `value` on every process (the others' `value` is ignored): small
    results and stage status go host to host, not through a file another host may not see."""
    import json

    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value if is_primary() else None).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buffer = np.zeros(size, np.uint8)
    if is_primary():
        buffer[:] = data
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes().decode())

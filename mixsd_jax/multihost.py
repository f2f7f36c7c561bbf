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

from mixsd_jax.errors import MixsdError

ENV_COORDINATOR = "MIXSD_COORDINATOR"
ENV_NUM_PROCESSES = "MIXSD_NUM_PROCESSES"
ENV_PROCESS_ID = "MIXSD_PROCESS_ID"
ENV_AUTO = "MIXSD_DISTRIBUTED"
ENV_TIMEOUT = "MIXSD_INIT_TIMEOUT"
ENV_HEARTBEAT = "MIXSD_HEARTBEAT_TIMEOUT"
FAILURE_KEY = "mixsd/failure"
ALIVE_KEY = "mixsd/alive"  # each process's heartbeat counter
LEFT = "left"  # the counter's value once its process exited normally
_WATCH = None  # this process's _Watch in a multi-process run


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
    # (below) names the silent host and exits cleanly; JAX's, which aborts the process with a
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
    _start_failure_watch()
    return True


# ----------------------------------------------------------------------------- one fails, all stop
#
# A process that fails tells the others through the coordination service's key-value store; each
# process watches that key on a daemon thread, so one blocked in a collective with the failed
# host (which no exception can reach) still prints the failing host's error and exits.


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def report_failure(message: str, wait_s: float = 10.0) -> None:
    """Tell every other process that this one failed with `message` (one line), and wait (at most
    `wait_s`) until they have seen it. Process 0 is not waited for: it hosts the coordinator, and
    once it has seen the failure and left, every other process's JAX runtime aborts."""
    import jax

    client = _client() if jax.distributed.is_initialized() else None
    if client is None or jax.process_count() == 1:
        return
    me = jax.process_index()
    try:
        client.key_value_set(FAILURE_KEY, f"{me}\t{message}")
    except Exception:  # noqa: BLE001 - another process failed first: its error is the one reported
        return
    deadline = time.monotonic() + wait_s
    for other in range(1, jax.process_count()):
        if other == me:
            continue
        try:
            client.blocking_key_value_get(f"{FAILURE_KEY}/seen/{other}", max(1, int((deadline - time.monotonic()) * 1000)))
        except Exception:  # noqa: BLE001 - gone or too slow: stop waiting for it
            pass


def heartbeat_timeout() -> int:
    """Seconds of silence after which a process counts as dead (MIXSD_HEARTBEAT_TIMEOUT, 30)."""
    return _env_int(os.environ, ENV_HEARTBEAT) or 30


def _start_failure_watch() -> None:
    import atexit
    import threading

    import jax

    if jax.process_count() == 1:
        return
    global _WATCH
    client, me = _client(), jax.process_index()
    watch = _WATCH = _Watch(client, me, jax.process_count(), heartbeat_timeout())
    stop = threading.Event()

    def run() -> None:
        # Short non-blocking looks: a thread blocked inside the runtime's RPC when the interpreter
        # exits would abort the process (the atexit hook below stops and joins this one first).
        while not stop.wait(0.5):
            if not watch.look():
                return

    thread = threading.Thread(target=run, name="mixsd-failure-watch", daemon=True)
    thread.start()

    def stop_watching() -> None:
        stop.set()
        thread.join(timeout=5)
        watch.leave()

    atexit.register(stop_watching)


def wait_if_a_peer_died(exc: BaseException) -> None:
    """After a runtime error (a collective whose peer vanished fails at once on CPU and GPU): wait
    until every other process has ticked since, or the watch has named the silent one and exited,
    so a killed host is reported as such rather than as this host's traceback."""
    from jax.errors import JaxRuntimeError

    watch = _WATCH
    if watch is None or not isinstance(exc, JaxRuntimeError):
        return
    # Two new ticks from every peer: one may be a killed host's last, written before it died.
    before = dict(watch.moves)
    deadline = time.monotonic() + watch.timeout_s + 5
    while time.monotonic() < deadline:
        if all(watch.moves[other] >= before[other] + 2 or watch.seen[other][0] == LEFT for other in before):
            return  # every peer is alive: the error is this host's own
        time.sleep(0.2)


class _Watch:
    """One process's view of the others: a failure posted by one of them, and whether each still
    ticks. Every process bumps its own counter in the coordination service each look; a counter
    that stops moving for `timeout_s` is a host killed without a word (a process that exits
    normally says so first), and the service itself not answering for that long is process 0,
    which hosts it, gone."""

    def __init__(self, client, me: int, processes: int, timeout_s: float):
        self.client, self.me, self.timeout_s = client, me, timeout_s
        self.ticks = 0
        now = time.monotonic()
        self.seen = {other: ("", now) for other in range(processes) if other != me}  # last counter, when it moved
        self.moves = {other: 0 for other in self.seen}  # how often each counter was seen to move
        self.answered = now

    def look(self) -> bool:
        """False once this process failed itself (its own error handling prints and exits)."""
        import sys

        now = time.monotonic()
        try:
            self.ticks += 1
            self.client.key_value_set(f"{ALIVE_KEY}/{self.me}", str(self.ticks), allow_overwrite=True)
            alive = dict(self.client.key_value_dir_get(f"{ALIVE_KEY}/"))
            failure = _try_get(self.client, FAILURE_KEY)
        except Exception:  # noqa: BLE001 - the coordination service does not answer
            if now - self.answered > self.timeout_s:
                self._stop(f"error: process 0 (the coordinator) stopped answering for {self.timeout_s:g} s "
                           "(killed, or out of memory?); stopping")
            return True
        self.answered = now
        if failure is not None:
            host, _, message = failure.partition("\t")
            if host == str(self.me):
                return False
            print(f"error: process {host} failed: {message}", file=sys.stderr, flush=True)
            try:
                self.client.key_value_set(f"{FAILURE_KEY}/seen/{self.me}", "1")
            finally:
                os._exit(1)
        for other, (last, since) in self.seen.items():
            value = alive.get(f"{ALIVE_KEY}/{other}", "")
            if value == LEFT:
                self.seen[other] = (LEFT, now)
                continue
            if value != last:
                self.seen[other] = (value, now)
                self.moves[other] += 1
            elif now - since > self.timeout_s:
                self._stop(f"error: process {other} stopped answering for {self.timeout_s:g} s "
                           "(killed, or out of memory?); stopping")
        return True

    def leave(self) -> None:
        """This process exits normally: the others stop counting its silence."""
        try:
            self.client.key_value_set(f"{ALIVE_KEY}/{self.me}", LEFT, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator already left
            pass

    @staticmethod
    def _stop(line: str) -> None:
        import sys

        print(line, file=sys.stderr, flush=True)
        os._exit(1)


def _try_get(client, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception as exc:  # noqa: BLE001 - a missing key raises NOT_FOUND; anything else is the service
        if "NOT_FOUND" in str(exc) or "not found" in str(exc).lower():
            return None
        raise


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

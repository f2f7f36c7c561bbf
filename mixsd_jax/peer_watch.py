"""One fails, all stop: a process that fails tells the others, and a host that dies silently is named.

A process that fails tells the others through the coordination service's key-value store; each
process watches that key on a daemon thread, so one blocked in a collective with the failed host
(which no exception can reach) still prints the failing host's error and exits. The same thread
bumps this process's heartbeat counter and watches the others': a counter that stops moving for
the heartbeat timeout (`multihost.heartbeat_timeout`) is a host killed without a word.
"""

from __future__ import annotations

import os
import time

FAILURE_KEY = "mixsd/failure"
ALIVE_KEY = "mixsd/alive"  # each process's heartbeat counter
LEFT = "left"  # the counter's value once its process exited normally
_WATCH = None  # this process's _Watch in a multi-process run


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


def start(timeout_s: float) -> None:
    """Watch the other processes from a daemon thread (multi-process runs only); `timeout_s` of
    silence makes a host dead."""
    import atexit
    import threading

    import jax

    if jax.process_count() == 1:
        return
    global _WATCH
    client, me = _client(), jax.process_index()
    watch = _WATCH = _Watch(client, me, jax.process_count(), timeout_s)
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

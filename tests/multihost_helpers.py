"""Launching a command as N local processes joined into one JAX run (CPU, coordinator on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_host(base: Path) -> Callable[[int], tuple[Path, dict]]:
    """Per process, what a pod host has to itself: a working directory, a HOME and a cache."""
    def host(process_id: int) -> tuple[Path, dict]:
        root = base / f"host{process_id}"
        for sub in ("work", "home", "cache"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        return root / "work", {"HOME": str(root / "home"), "MIXSD_CACHE": str(root / "cache"),
                               "XDG_CACHE_HOME": str(root / "cache")}
    return host


def start(args: list[str], processes: int = 2, devices_per_process: int = 2,
          hosts: Callable[[int], tuple[Path, dict]] | None = None) -> list[subprocess.Popen]:
    """`python -m mixsd_jax.cli *args` once per process, joined through MIXSD_* variables; `hosts`
    gives each process its own working directory and environment (see `own_host`)."""
    port = free_port()
    procs = []
    for process_id in range(processes):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
               "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "MIXSD_COORDINATOR": f"127.0.0.1:{port}",
               "MIXSD_NUM_PROCESSES": str(processes), "MIXSD_PROCESS_ID": str(process_id)}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        cwd = ROOT
        if hosts is not None:
            cwd, own = hosts(process_id)
            env.update(own)
        procs.append(subprocess.Popen([sys.executable, "-m", "mixsd_jax.cli", *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run(args: list[str], timeout: float = 300, **kwargs) -> list[str]:
    """Runs to the end; every process must exit 0. Returns each process's output."""
    procs = start(args, **kwargs)
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        stop(procs)
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 300, **kwargs) -> None:
    """Starts the processes and SIGKILLs all of them as soon as `ready()` is true."""
    procs = start(args, **kwargs)
    try:
        deadline = time.time() + timeout
        while not ready():
            if any(p.poll() is not None for p in procs):
                out = "".join(p.communicate()[0] for p in procs if p.poll() is not None)
                raise AssertionError(f"a process ended before the kill point:\n{out[-4000:]}")
            if time.time() > deadline:
                raise AssertionError("kill point not reached in time")
            time.sleep(0.02)
    finally:
        stop(procs)

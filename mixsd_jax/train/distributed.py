"""Multi-host start-up: one process per host joins the others before JAX touches a device.

Sources, first match wins: the config's `distributed` section, the environment
(`MIXSD_COORDINATOR=host:port`, `MIXSD_NUM_PROCESSES`, `MIXSD_PROCESS_ID`), and
`distributed.auto` / `MIXSD_DISTRIBUTED=auto`, which lets JAX detect the cluster itself (TPU pod
slices, SLURM, Open MPI). With none of them the run is single-process and nothing is called.
"""

from __future__ import annotations

import os

from mixsd_jax.errors import MixsdError
from mixsd_jax.train.config import DistributedConfig

ENV_COORDINATOR = "MIXSD_COORDINATOR"
ENV_NUM_PROCESSES = "MIXSD_NUM_PROCESSES"
ENV_PROCESS_ID = "MIXSD_PROCESS_ID"
ENV_AUTO = "MIXSD_DISTRIBUTED"


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
    jax.distributed.initialize(**kwargs)
    return True

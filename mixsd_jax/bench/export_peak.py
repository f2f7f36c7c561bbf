"""`mixsd bench export-peak`: the HF export's measured per-device peak on the machine at hand.

CPU devices report no memory statistics, so the bench counts what JAX holds: at every gather of
the export (models/gather.py, while the gathered copy is on the devices) it sums the bytes of
every live array's shards per device (`jax.live_arrays()`), and reports the largest sum, next to
the sharded state held before the export and the largest single tensor (one layer's slice) of the
export. XLA's scratch space during a gather is not counted; arrays are. Run it as several
processes (MIXSD_* variables, as every command) to measure the multi-host gather.
"""

from __future__ import annotations

import tempfile

import numpy as np


def live_bytes_per_device() -> dict[int, int]:
    """Bytes of every live JAX array on each of this process's devices (device id -> bytes)."""
    import jax

    held = {d.id: 0 for d in jax.local_devices()}
    counted = set()  # a global array's shards are live arrays of their own: each buffer once
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            buffer = (shard.device.id, shard.data.unsafe_buffer_pointer())
            if buffer not in counted:
                counted.add(buffer)
                held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return held


def bench_export_peak(model: str, mesh_cfg, param_dtype: str = "float32", export_dtype: str = "float32",
                      out: str | None = None) -> dict:
    import jax

    from mixsd_jax.models.checkpoint import export_hf, hf_entries, load_hf
    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.models.sharding import make_mesh

    model_dir = resolve_model(model)
    mesh = make_mesh(mesh_cfg)
    cfg, params = load_hf(model_dir, param_dtype=param_dtype, mesh=mesh)
    state = max(live_bytes_per_device().values())
    peaks = []

    def on_gather() -> None:
        peaks.append(max(live_bytes_per_device().values()))

    itemsize = np.dtype(param_dtype).itemsize
    entries = hf_entries(params, cfg)
    largest = max(entries, key=lambda e: int(np.prod(e[4])))
    with tempfile.TemporaryDirectory() as scratch:
        export_hf(params, cfg, out or f"{scratch}/hf", dtype=export_dtype, on_gather=on_gather)
    whole = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
    largest_bytes = int(np.prod(largest[4])) * itemsize
    peak = max(peaks)
    return {
        "bench": "export_peak",
        "model": str(model),
        "processes": jax.process_count(),
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "param_dtype": param_dtype,
        "gathers": len(peaks),
        "model_bytes": whole,
        "sharded_state_bytes_per_device": state,
        "peak_bytes_per_device": peak,
        "peak_over_state_bytes": peak - state,
        "largest_tensor": largest[0],
        "largest_tensor_bytes": largest_bytes,
        "peak_within_state_plus_largest_tensor": peak <= state + largest_bytes,
    }

"""One parameter, or one layer's slice of a stacked one, copied whole to host memory.

The HF export writes tensors one at a time, so it never needs more of a sharded model on the
devices than one tensor at once. Within one host each device's block of it is copied down
directly. Across hosts the tensor is first replicated on every device (a gather: each host then
holds it whole and copies it down), and the layer is cut and gathered by one jitted function, so
the devices hold the gathered copy and nothing else beyond the sharded state. `on_gather` is
called while that copy is on the devices (the export's memory bench measures there).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def host_copy(source: jax.Array, layer: int | None, on_gather: Callable[[], None] | None = None) -> np.ndarray:
    """`source` (or `source[layer]`) as one numpy array on this host."""
    if source.is_fully_addressable:
        part = source if layer is None else source[layer]
        if on_gather is not None:
            on_gather()
        return np.asarray(part)
    replicated = _replicated(source.sharding)
    if layer is None:
        whole = jax.jit(_same, out_shardings=replicated)(source)
    else:
        whole = jax.jit(_layer, out_shardings=replicated)(source, np.int32(layer))
    if on_gather is not None:
        on_gather()
    return np.asarray(whole.addressable_data(0))


def _same(x):
    return x


def _layer(stacked, index):
    return jax.lax.dynamic_index_in_dim(stacked, index, keepdims=False)


def _replicated(sharding) -> NamedSharding:
    if isinstance(sharding, NamedSharding):
        return sharding.update(spec=PartitionSpec())
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    return NamedSharding(Mesh(np.array(devices), ("all",)), PartitionSpec())

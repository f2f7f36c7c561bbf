"""safetensors files in a bucket, read by byte range: the header once, then only the rows a host's
devices hold.

A safetensors file is an 8-byte little-endian header length, a JSON header ({name: dtype, shape,
data_offsets}) and the tensors' bytes, row-major. A block `[a:b, ...]` of a tensor is therefore
the one contiguous range of its rows a..b, cut further in memory: on a pod each host reads the rows
of its shards from the bucket, never the whole model (`safetensors.safe_open` needs a local file).
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError

_HEADER_LIMIT = 100 << 20  # safetensors' own bound on the header
# safetensors dtype names -> numpy dtypes (the ones HF checkpoints of our model families use).
ST_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}


class RangedSlice:
    """The parts of `safe_open(...).get_slice(name)` that loading uses, over ranged reads."""

    def __init__(self, path, entry: dict, data_start: int):
        self._path = path
        self._dtype = entry["dtype"]
        self._shape = tuple(entry["shape"])
        self._start = data_start + entry["data_offsets"][0]
        self._nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]

    def get_shape(self) -> list[int]:
        return list(self._shape)

    def get_dtype(self) -> str:
        return self._dtype

    def __getitem__(self, idx) -> np.ndarray:
        dtype = ST_DTYPES[self._dtype]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not self._shape:
            return self._read(0, dtype.itemsize).view(dtype).reshape(())
        head = idx[0]
        rows = range(self._shape[0])[head if isinstance(head, slice) else slice(head, head + 1)]
        if len(rows) == 0:
            return np.zeros((0, *self._shape[1:]), dtype)[(slice(None), *idx[1:])]
        first, last = min(rows), max(rows)
        row_bytes = self._nbytes // self._shape[0]
        block = self._read(first * row_bytes, (last - first + 1) * row_bytes).view(dtype)
        block = block.reshape((last - first + 1, *self._shape[1:]))
        local = slice(rows.start - first, rows.stop - first if rows.stop >= 0 else None, rows.step)
        picked = block[(local, *idx[1:])]
        return picked if isinstance(head, slice) else picked[0]

    def _read(self, offset: int, size: int) -> np.ndarray:
        with self._path.open("rb") as f:
            f.seek(self._start + offset)
            data = f.read(size)
        if len(data) != size:
            raise MixsdError(f"{self._path}: file ends inside a tensor (truncated upload?)")
        return np.frombuffer(data, np.uint8)


def open_ranged(path) -> dict[str, RangedSlice]:
    """Name -> slice of a safetensors file at a URL (reads only its header here)."""
    path = storage.path(path)
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise MixsdError(f"{path}: not a readable safetensors file (shorter than its header)")
        (size,) = struct.unpack("<Q", head)
        if size > _HEADER_LIMIT:
            raise MixsdError(f"{path}: not a readable safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MixsdError(f"{path}: not a readable safetensors file (header is not JSON)") from None
    header.pop("__metadata__", None)
    return {name: RangedSlice(path, entry, 8 + size) for name, entry in header.items()}


def place_reading_once(shape: tuple, sharding, source, dtype, stacked: bool):
    """A global array on `sharding` whose blocks are cut from one read per tensor.

    Each of this host's devices holds a block; read device by device (`make_array_from_callback`),
    a tensor sharded along its columns would be fetched whole once per device. Here the host reads
    the bounding box of its devices' blocks once (per layer, for a stacked parameter: `source` is
    then the list of per-layer tensors) and cuts every device's block from it: a bucket is read
    once per host, and host memory holds the host's blocks plus one layer.
    """
    import jax

    bounds = {device: tuple(s.indices(n)[:2] for s, n in zip(index, shape))
              for device, index in sharding.addressable_devices_indices_map(shape).items()}
    blocks = {box: np.empty([stop - start for start, stop in box], dtype) for box in set(bounds.values())}

    def fill(boxes, tensor, offset: int, layer: int | None) -> None:
        box = [(min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)) for d in range(offset, len(shape))]
        read = np.asarray(tensor[tuple(slice(lo, hi) for lo, hi in box)]).astype(dtype)
        for b in boxes:
            cut = read[tuple(slice(b[d][0] - box[d - offset][0], b[d][1] - box[d - offset][0])
                             for d in range(offset, len(shape)))]
            if layer is None:
                blocks[b][...] = cut
            else:
                blocks[b][layer - b[0][0]] = cut

    if stacked:
        for layer in sorted({i for b in blocks for i in range(*b[0])}):
            fill([b for b in blocks if b[0][0] <= layer < b[0][1]], source[layer], 1, layer)
    else:
        fill(list(blocks), source, 0, None)
    arrays = [jax.device_put(blocks[box], device) for device, box in bounds.items()]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

"""Random-access record sources and the trainer's batch stream, with step = resumable position.

Epoch e visits the records in `epoch_order(n, seed, e)`, a permutation that depends only on
(seed, epoch), so batch k of a run is a pure function of (records, batch size, seed, k). A
resumed run passes `start_step=k` and gets exactly batches k, k+1, ... of a fresh run; there is
no iterator state to checkpoint besides the step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from mixsd_jax.data.records import Record, read_records
from mixsd_jax import storage
from mixsd_jax.errors import MixsdError


class TfdsRecordSource:
    """Records of a dataset written by `tfds_builder.build_tfds`, read lazily by index."""

    def __init__(self, dataset_dir: Path):
        import tensorflow_datasets as tfds

        from mixsd_jax.data.tfds_builder import SPLIT

        self.path = dataset_dir
        self._source = tfds.builder_from_directory(str(dataset_dir)).as_data_source(split=SPLIT)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Record]:
        """Several records in one read, which array_record serves faster than one by one."""
        from mixsd_jax.data.tfds_builder import record_from_example

        for index in indices:
            if not 0 <= index < len(self):
                raise IndexError(f"record {index} of {len(self)}")
        return [record_from_example(example) for example in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"TfdsRecordSource({str(self.path)!r}, {len(self)} records)"


def record_source(path: str | Path, *, allow_empty_assistant: bool = False) -> Sequence[Record]:
    """A JSONL file (read and validated into memory) or a TFDS dataset directory (the versioned
    directory holding dataset_info.json, or a folder with exactly one such directory below it)."""
    path = storage.path(path)  # TFDS reads a bucket URL itself (str of an epath keeps it)
    if path.is_file():
        return read_records(path, allow_empty_assistant=allow_empty_assistant)
    if not path.is_dir():
        raise MixsdError(f"{path}: no such file or directory")
    if (path / "dataset_info.json").is_file():
        return TfdsRecordSource(path)
    # TFDS writes <data_dir>/<name>/<version>/dataset_info.json: three levels at most (and a bucket
    # lists no recursive patterns).
    found = sorted(p.parent for depth in range(1, 4) for p in path.glob("/".join(["*"] * depth) + "/dataset_info.json"))
    if len(found) != 1:
        what = "no TFDS dataset" if not found else f"{len(found)} TFDS datasets ({', '.join(map(str, found))})"
        raise MixsdError(f"{path}: expected a JSONL file or one TFDS dataset directory, found {what}")
    return TfdsRecordSource(found[0])


def training_records(path: str | Path) -> list[Record]:
    """Every record of a training file or TFDS directory, in order; none at all is a MixsdError."""
    source = record_source(path)
    records = source if isinstance(source, list) else source.__getitems__(list(range(len(source))))
    if not records:
        raise MixsdError(f"{path}: no training records (the file is empty)")
    return records


def epoch_order(num_records: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the records: a permutation of range(num_records)."""
    if seed < 0 or epoch < 0:
        raise MixsdError(f"seed {seed} and epoch {epoch} must be non-negative")
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def _fetch(source: Sequence[Record], indices: list[int]) -> list[Record]:
    getitems = getattr(source, "__getitems__", None)
    return list(getitems(indices)) if getitems is not None else [source[i] for i in indices]


def batches_per_epoch(num_records: int, batch_size: int, drop_remainder: bool = True) -> int:
    if batch_size < 1:
        raise MixsdError(f"batch size {batch_size}: expected a positive integer")
    full, rest = divmod(num_records, batch_size)
    return full + (1 if rest and not drop_remainder else 0)


def batch_iterator(
    source: Sequence[Record],
    batch_size: int,
    seed: int,
    start_step: int = 0,
    drop_remainder: bool = True,
    num_epochs: int | None = None,
) -> Iterator[list[Record]]:
    """Lists of records, reshuffled every epoch; step k is batch k % per_epoch of epoch
    k // per_epoch. Runs forever unless `num_epochs` is given."""
    import grain

    per_epoch = batches_per_epoch(len(source), batch_size, drop_remainder)
    if per_epoch == 0:
        raise MixsdError(f"batch size {batch_size} is larger than the {len(source)} records (drop_remainder)")
    if start_step < 0:
        raise MixsdError(f"start step {start_step}: expected a non-negative integer")
    epoch, offset = divmod(start_step, per_epoch)
    while num_epochs is None or epoch < num_epochs:
        order = epoch_order(len(source), seed, epoch)
        batches = (
            grain.MapDataset.source(order)
            .batch(batch_size, drop_remainder=drop_remainder, batch_fn=lambda ids: [int(i) for i in ids])
            .map(lambda ids: _fetch(source, ids))
        )
        # Slicing is lazy: the batches before `offset` are never read.
        yield from batches[offset:]
        epoch, offset = epoch + 1, 0

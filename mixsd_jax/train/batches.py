"""Tokenized examples -> fixed-shape training batches, in a seed-determined order.

Tokenization (records -> ids with loss masks) is `data/tokenize.py`, shared with evaluation.

Data order: epoch e visits the examples in `epoch_order(n, seed, e)`; step k of a run is a pure
function of (examples, batch size, seed, k), so a resumed run sees the same batches as a straight
one. The last batch of an epoch is filled with empty rows (no tokens, no loss) rather than
dropped or wrapped, so every example is seen exactly once per epoch.

Shapes: rows are right-padded to a power-of-two bucket (at least 16, at most `max_seq_len`), so a
run compiles the step for a handful of lengths (or to `max_seq_len` itself with `pad_to_max`: one
compile, more padding). With packing, documents are laid into rows of `max_seq_len` in visiting
order (a new row when the next one does not fit), each with its own segment id and positions
restarting at 0, so attention never crosses documents.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from mixsd_jax.data.grain_source import epoch_order
from mixsd_jax.data.tokenize import Example
from mixsd_jax.errors import MixsdError

MIN_BUCKET = 16


# ----------------------------------------------------------------------------- batch plan


def batch_width(length: int, max_seq_len: int) -> int:
    """A training batch's width: the power of two (at least MIN_BUCKET) holding `length`, at most
    `max_seq_len`, so a run compiles its train step for a few widths only."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_seq_len)


class BatchPlan:
    """Which examples make up step k's batch, and that batch as host arrays [A, M, T]."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        max_seq_len: int,
        packing: bool = False,
        pad_to_max: bool = False,
    ):
        if not examples:
            raise MixsdError("no training examples")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.max_seq_len = max_seq_len
        self.packing = packing
        self.pad_to_max = pad_to_max
        self._packed_steps: dict[int, int] = {}

    # -- order

    @functools.lru_cache(maxsize=4)
    def epoch_rows(self, epoch: int) -> tuple[tuple[int, ...], ...]:
        """The rows of one epoch, each a tuple of example indices, in visiting order."""
        order = [int(i) for i in epoch_order(len(self.examples), self.seed, epoch)]
        if not self.packing:
            return tuple((i,) for i in order)
        rows: list[tuple[int, ...]] = []
        current: list[int] = []
        used = 0
        for i in order:
            length = self.examples[i].length
            if current and used + length > self.max_seq_len:
                rows.append(tuple(current))
                current, used = [], 0
            current.append(i)
            used += length
        rows.append(tuple(current))
        return tuple(rows)

    def steps_in_epoch(self, epoch: int) -> int:
        if not self.packing:
            return -(-len(self.examples) // self.batch_size)
        if epoch not in self._packed_steps:
            self._packed_steps[epoch] = -(-len(self.epoch_rows(epoch)) // self.batch_size)
        return self._packed_steps[epoch]

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of global step `step`."""
        if not self.packing:
            return divmod(step, self.steps_in_epoch(0))
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def batch_rows(self, step: int) -> list[tuple[int, ...]]:
        """batch_size rows of example indices; rows past the end of the epoch are empty."""
        epoch, index = self.locate(step)
        rows = list(self.epoch_rows(epoch)[index * self.batch_size : (index + 1) * self.batch_size])
        return rows + [()] * (self.batch_size - len(rows))

    # -- arrays

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        rows = self.batch_rows(step)
        used = max(sum(self.examples[i].length for i in row) for row in rows)
        T = self.max_seq_len if self.pad_to_max else batch_width(used, self.max_seq_len)
        B = len(rows)
        tokens = np.zeros((B, T), np.int32)
        targets = np.zeros((B, T), np.int32)
        loss_mask = np.zeros((B, T), np.float32)
        segment_ids = np.zeros((B, T), np.int32)
        positions = np.zeros((B, T), np.int32)
        for r, row in enumerate(rows):
            start = 0
            for segment, i in enumerate(row, start=1):
                ex = self.examples[i]
                n = ex.length
                tokens[r, start : start + n] = ex.ids[:-1]
                targets[r, start : start + n] = ex.ids[1:]
                loss_mask[r, start : start + n] = ex.mask[1:]
                segment_ids[r, start : start + n] = segment
                positions[r, start : start + n] = np.arange(n)
                start += n
        A, M = self.grad_accum, B // self.grad_accum
        arrays = dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions)
        return {key: value.reshape(A, M, T) for key, value in arrays.items()}

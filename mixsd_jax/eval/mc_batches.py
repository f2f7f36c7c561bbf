"""Batch shapes for log-likelihood scoring: rows and scored windows rounded up to powers of two, and
one window size per batch (biggest first), so a CPU pays little padding and few kernels compile."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

MIN_ROW = 32
MIN_WINDOW = 8


def pow2_at_least(n: int, floor: int) -> int:
    size = floor
    while size < n:
        size *= 2
    return size


@dataclasses.dataclass(frozen=True)
class TokenScores:
    logprobs: np.ndarray  # [n] log-prob of each scored token
    greedy: np.ndarray  # [n] the token was the model's argmax


def shape_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[tuple[list[int], int]]:
    """Indices of items of (window, row) sizes cut into batches that share one window size, biggest
    first; each with its padded row count (a power of two, at most `batch_size`)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0], -sizes[i][1], i))
    batches = []
    start = 0
    while start < len(order):
        window = sizes[order[start]][0]
        stop = start
        while stop < len(order) and stop - start < batch_size and sizes[order[stop]][0] == window:
            stop += 1
        chunk = order[start:stop]
        batches.append((chunk, min(pow2_at_least(len(chunk), 1), batch_size)))
        start = stop
    return batches

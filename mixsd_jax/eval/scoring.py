"""Accuracy of scored replies: the share correct with a 95% Wilson interval, per operation too.

Whether one reply is right is decided in `mixsd_jax.answers.scoring`; this module only counts.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from mixsd_jax.answers.scoring import ScoredItem
from mixsd_jax.eval.intervals import wilson_interval


def _accuracy_block(items: list[ScoredItem]) -> dict:
    n = len(items)
    correct = sum(item.correct for item in items)
    low, high = wilson_interval(correct, n)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else None,
        "ci95": [low, high],
        "format_found": sum(item.format_found for item in items) / n if n else None,
    }


def summarize(items: Iterable[ScoredItem]) -> dict:
    """Accuracy with a 95% Wilson interval, plus a per-operation breakdown when items carry ops."""
    items = list(items)
    summary = _accuracy_block(items)
    by_op: dict[str, list[ScoredItem]] = defaultdict(list)
    for item in items:
        if item.op is not None:
            by_op[item.op].append(item)
    if by_op:
        summary["per_op"] = {op: _accuracy_block(by_op[op]) for op in sorted(by_op)}
    return summary

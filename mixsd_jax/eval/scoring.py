"""The in-domain memorisation scorer (REFERENCE.md §4.1): extract, normalise, compare, summarise.

A prediction is the last brace-matched `\\boxed{}`, else the last `<answer>...</answer>`, else the
last number, else the whole text. Both sides are normalised (LaTeX wrappers, `$`, outer braces,
numbers including `\\frac{a}{b}` and `1,000`, case and whitespace). `strict` needs equality (numbers
within 1e-6; a numeric gold also accepts what math-verify finds equal, `answers.math_equal`);
`loose` also accepts the gold text inside the prediction (the reference's KGFact default, which can
credit a wrong answer that merely contains the gold).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

# The extraction and normalisation rules are shared with `data` and `sampling`; re-exported here
# because scorer callers know them by these names.
from mixsd_jax.answers import (  # noqa: F401
    as_number,
    extract_prediction,
    format_found,
    math_equal,
    SCORE_MODES,
    normalize,
    same_answer,
    score,
    text_form,
)
from mixsd_jax.errors import MixsdError
from mixsd_jax.eval.intervals import wilson_interval  # noqa: F401  (scipy's; callers know it from here)


_OP_FUNCTION = re.compile(r"\bfunction ([A-Za-z_]\w*)\.")
_OP_CALL = re.compile(r"\b([A-Za-z_]\w*)\(-?\d+\)")


def kgfunc_operation(prompt: str) -> str | None:
    """The operation a KGFunc prompt asks about: `function X.` first, else the first `X(digits)`."""
    match = _OP_FUNCTION.search(prompt) or _OP_CALL.search(prompt)
    return match.group(1) if match else None


@dataclass(frozen=True)
class ScoredItem:
    correct: bool
    format_found: bool = True
    op: str | None = None
    id: str = ""
    prediction: str = ""
    gold: str = ""


def score_item(
    response: str, gold: str, mode: str = "strict", prompt: str | None = None, id: str = "", op: str | None = None
) -> ScoredItem:
    """Scores one response. The operation for the per-op breakdown is `op` when given (e.g. a
    record's `subject`), else parsed from `prompt` when one is given."""
    if op is None and prompt is not None:
        op = kgfunc_operation(prompt)
    return ScoredItem(
        correct=score(response, gold, mode),
        format_found=format_found(response),
        op=op,
        id=id,
        prediction=extract_prediction(response),
        gold=gold,
    )


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

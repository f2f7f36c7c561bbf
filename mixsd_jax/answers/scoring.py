"""The reference's in-domain scorer of one reply (docs/reference.md, Memorisation scorer): right or wrong.

A prediction is the last brace-matched `\\boxed{}`, else the last `<answer>...</answer>`, else the
last number, else the whole text. Both sides are normalised (LaTeX wrappers, `$`, outer braces,
numbers including `\\frac{a}{b}` and `1,000`, case and whitespace). `strict` needs equality (numbers
within 1e-6; a numeric gold also accepts what math-verify finds equal, `text.math_equal`);
`loose` also accepts the gold text inside the prediction (the reference's KGFact default, which can
credit a wrong answer that merely contains the gold). It is also one of the run criteria
(`answers.criteria`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mixsd_jax.answers.text import as_number, extract_prediction, format_found, math_equal, same_answer, text_form
from mixsd_jax.errors import MixsdError

SCORE_MODES = ("strict", "loose")


def score(prediction_text: str, gold: str, mode: str = "strict") -> bool:
    """Whether the answer extracted from `prediction_text` matches the gold answer string."""
    if mode not in SCORE_MODES:
        raise MixsdError(f"unknown score mode {mode!r} (known: {', '.join(SCORE_MODES)})")
    prediction = extract_prediction(prediction_text)
    if same_answer(prediction, gold):
        return True
    # A numeric gold (KGFunc, SimpleQA years) also accepts what math-verify finds equal: `x=66`,
    # `\frac{132}{2}`, `6.6 \times 10^1`. Text golds never reach it (it reads `sirap` as `paris`).
    if as_number(gold) is not None and math_equal(prediction, gold):
        return True
    if mode == "loose":
        gold_text = text_form(gold)
        return bool(gold_text) and gold_text in text_form(prediction)
    return False


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

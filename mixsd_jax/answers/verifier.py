"""The MixSD rule verifier: extract an answer from a generated text and compare it with the GT's.

Modes (docs/reference.md, Verifier and retries, plus `contains`):
- `boxed`: content of the LAST `\\boxed{` (brace-matched), stripped; None when absent or when that
  last one is unbalanced. Only the braced form `\\boxed{...}` counts, not `\\boxed 5`.
- `last_number`: the last integer/decimal with optional minus. Unlike the reference, a
  thousands-grouped number is one number (`1,000` -> `1,000`, where the reference gives `000`).
- `boxed_or_last_number`: boxed, else last number.
- `contains`: for models too small to write `\\boxed{}`. The GT answer is the boxed content of y*
  (else the whole stripped y*); a response passes when the normalized GT answer occurs in the
  normalized response as whole words (so GT `1` does not match `10`).

`Verifier(mode, normalized=False)` keeps the reference's comparison (equal after `.strip()`, case
sensitive); `normalized=True` compares `normalize_answer` forms instead.

`generation_verifier` picks the MixSD generator's verifier: the run's answer criterion
(`answers.criteria`) when the config names one, else the extract-mode verifier, both behind one
interface (`gt_answer(gt_text, prompt)` once per record, `check(response, gold)` per attempt).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from mixsd_jax.answers.criteria import Criterion, criterion_for
from mixsd_jax.answers.text import last_boxed, last_number, normalize_answer, occurs_as_words
from mixsd_jax.errors import MixsdError

EXTRACT_MODES = ("boxed", "last_number", "boxed_or_last_number", "contains")


def extract_answer(text: str, mode: str) -> str | None:
    """The answer `mode` finds in `text`; for `contains`, boxed else the whole stripped text."""
    check_mode(mode)
    if mode == "boxed":
        return last_boxed(text)
    if mode == "last_number":
        return last_number(text)
    if mode == "boxed_or_last_number":
        boxed = last_boxed(text)
        return boxed if boxed is not None else last_number(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    return text.strip() or None


def check_mode(mode: str) -> None:
    if mode not in EXTRACT_MODES:
        raise MixsdError(f"unknown extract_mode {mode!r} (known: {', '.join(EXTRACT_MODES)})")


@dataclasses.dataclass(frozen=True)
class Verifier:
    mode: str = "boxed"
    normalized: bool = False

    def __post_init__(self):
        check_mode(self.mode)

    def gt_answer(self, gt_text: str) -> str | None:
        """The answer in the ground-truth text; None means no attempt can ever pass."""
        return extract_answer(gt_text, self.mode)

    def check(self, response: str, gt_answer: str | None) -> bool:
        if gt_answer is None:
            return False
        if self.mode == "contains":
            return occurs_as_words(normalize_answer(gt_answer), normalize_answer(response))
        answer = extract_answer(response, self.mode)
        if answer is None:
            return False
        if self.normalized:
            return normalize_answer(answer) == normalize_answer(gt_answer)
        return answer.strip() == gt_answer.strip()

    def missing_gt_answers(self, gt_texts: Iterable[str]) -> list[int]:
        """Indices of GT texts with no extractable answer, so callers can count and report them."""
        return [i for i, text in enumerate(gt_texts) if self.gt_answer(text) is None]


@dataclasses.dataclass(frozen=True)
class ModeVerifier:
    verifier: Verifier

    def gt_answer(self, gt_text: str, prompt: str = "") -> str | None:
        return self.verifier.gt_answer(gt_text)  # extract modes never look at the prompt

    def check(self, response: str, gold: str | None) -> bool:
        return self.verifier.check(response, gold)


def generation_verifier(criterion: str | None, extract_mode: str, normalized: bool, records) -> Criterion | ModeVerifier:
    """The run's criterion with the records' training entities, else the extract mode's verifier."""
    if criterion is not None:
        return criterion_for(criterion, records)
    return ModeVerifier(Verifier(extract_mode, normalized))

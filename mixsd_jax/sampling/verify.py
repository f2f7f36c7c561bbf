"""The MixSD rule verifier: extract an answer from a generated text and compare it with the GT's.

Modes (REFERENCE.md §1.6, plus `contains`):
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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from mixsd_jax.errors import MixsdError

EXTRACT_MODES = ("boxed", "last_number", "boxed_or_last_number", "contains")

_BOXED = "\\boxed{"
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_GROUPED_NUMBER = re.compile(r"(?<![\d,])(-?\d{1,3}(?:,\d{3})+)(?![\d,])")
# Wrappers whose content is the answer: `\text{Paris}` -> `Paris`.
_WRAPPERS = ("text", "textbf", "textit", "texttt", "mathrm", "mathbf", "mathit", "mbox", "operatorname")
_WRAPPER_START = re.compile(r"\\(?:" + "|".join(_WRAPPERS) + r")\s*\{")


def matching_brace(text: str, open_index: int) -> int | None:
    """Index of the `}` closing the `{` at `open_index`, or None when it is never closed."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    open_index = start + len(_BOXED) - 1
    close = matching_brace(text, open_index)
    if close is None:
        return None
    return text[open_index + 1 : close].strip()


def last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


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


def peel_wrappers(s: str) -> str:
    """`\\text{a} b \\mathrm{c}` -> `a b c` (brace-matched, nested wrappers too)."""
    while True:
        match = _WRAPPER_START.search(s)
        if match is None:
            return s
        open_index = match.end() - 1
        close = matching_brace(s, open_index)
        if close is None:
            return s
        s = s[: match.start()] + s[open_index + 1 : close] + s[close + 1 :]


def peel_outer_braces(s: str) -> str:
    """`{{x}}` -> `x`; `{a}{b}` stays, because its first brace does not close at the end."""
    while s.startswith("{") and matching_brace(s, 0) == len(s) - 1:
        s = s[1:-1].strip()
    return s


def normalize_answer(s: str) -> str:
    s = s.strip().replace("$", "")
    s = peel_outer_braces(peel_wrappers(s).strip())
    s = _GROUPED_NUMBER.sub(lambda m: m.group(1).replace(",", ""), s)
    s = " ".join(s.split()).lower()
    return s.rstrip(".").rstrip()


def occurs_as_words(needle: str, haystack: str) -> bool:
    """True when `needle` occurs in `haystack` not glued to a letter or digit on either side."""
    if not needle:
        return False
    start = haystack.find(needle)
    while start >= 0:
        end = start + len(needle)
        before_ok = start == 0 or not (haystack[start - 1].isalnum() and needle[0].isalnum())
        after_ok = end == len(haystack) or not (haystack[end].isalnum() and needle[-1].isalnum())
        if before_ok and after_ok:
            return True
        start = haystack.find(needle, start + 1)
    return False


def check_mode(mode: str) -> None:
    if mode not in EXTRACT_MODES:
        raise MixsdError(f"unknown extract_mode {mode!r} (known: {', '.join(EXTRACT_MODES)})")


@dataclass(frozen=True)
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

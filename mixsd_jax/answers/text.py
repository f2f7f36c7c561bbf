"""Answer text: where the answer sits in a reply, and whether two answers are the same.

The pieces every judge of an answer shares (`data` reads a record's gold answer with them, the
verifier, the scorer and the criteria of this package build on them):

- Extraction: the last brace-matched `\\boxed{...}` (`last_boxed`), the last number
  (`last_number`; a thousands-grouped number is one number), and the scorer's order
  (`extract_prediction`: boxed, `<answer>` tag, last number, whole text).
- Normalisation: LaTeX wrappers (`\\text{}` ...), `$`, outer braces, number grouping, case and
  whitespace (`normalize_answer` for text, `normalize` which also reads numbers and
  `\\frac{a}{b}`).
- Comparison: `same_answer` (normalised equality, numbers within 1e-6), and `math_equal`, the
  reference's math scorer: `math-verify` `parse` + `verify` on `\\boxed{}`-wrapped answers (so
  `\\frac{1}{2}` = `0.5`, `x=3` = `3`, `(1,2]` is an interval), exact string match when the
  parser fails.
"""

from __future__ import annotations

import math
import re
import threading


_BOXED = "\\boxed{"
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
# The scorer's number keeps a trailing '.' as the reference's regex does; `as_number` reads it.
_SCORER_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d*)?|-?\d+(?:\.\d*)?")
_GROUPED_NUMBER = re.compile(r"(?<![\d,])(-?\d{1,3}(?:,\d{3})+)(?![\d,])")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FRACTION = re.compile(r"^(-?)\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")
_PLAIN_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$")
_GROUPED = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d*)?$")
# Wrappers whose content is the answer: `\text{Paris}` -> `Paris`.
_WRAPPERS = ("text", "textbf", "textit", "texttt", "mathrm", "mathbf", "mathit", "mbox", "operatorname")
_WRAPPER_START = re.compile(r"\\(?:" + "|".join(_WRAPPERS) + r")\s*\{")
# The reference's math_verify limits (seconds). math-verify enforces them with SIGALRM, which only
# the main thread may set: off it, answers are parsed and compared without a time limit.
PARSE_TIMEOUT_S = 10
VERIFY_TIMEOUT_S = 30

# ----------------------------------------------------------------------------- extraction


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
    """Content of the LAST `\\boxed{` (brace-matched), stripped; None when absent or unbalanced."""
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


def answer_tag(text: str) -> str | None:
    """Content of the last `<answer>...</answer>`, stripped."""
    tags = _ANSWER_TAG.findall(text)
    return tags[-1].strip() if tags else None


def extract_prediction(text: str) -> str:
    """The scorer's order: boxed, else `<answer>` tag, else last number, else the whole text."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    tag = answer_tag(text)
    if tag is not None:
        return tag
    numbers = _SCORER_NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    return text.strip()


def format_found(text: str) -> bool:
    """The text used an answer format (boxed or answer tag), right or wrong."""
    return last_boxed(text) is not None or _ANSWER_TAG.search(text) is not None


# ----------------------------------------------------------------------------- normalisation


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
    """The verifier's text form: no `$`, wrappers or outer braces, `1,000` -> `1000`, lowercase."""
    s = s.strip().replace("$", "")
    s = peel_outer_braces(peel_wrappers(s).strip())
    s = _GROUPED_NUMBER.sub(lambda m: m.group(1).replace(",", ""), s)
    s = " ".join(s.split()).lower()
    return s.rstrip(".").rstrip()


def as_number(s: str) -> float | None:
    """The value of a plain, comma-grouped or `\\frac{a}{b}` number; None for anything else."""
    s = s.strip()
    fraction = _FRACTION.match(s)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        try:
            value = float(numerator) / float(denominator)
        except (ValueError, ZeroDivisionError):
            return None
        return -value if sign else value
    if _GROUPED.match(s):
        s = s.replace(",", "")
    if not _PLAIN_NUMBER.match(s.lower()):
        return None
    value = float(s)
    return value if math.isfinite(value) else None


def text_form(s: str) -> str:
    """The scorer's text form: no `$`, wrappers or outer braces, whitespace collapsed, lowercase."""
    s = peel_outer_braces(peel_wrappers(s.replace("$", "")).strip())
    return " ".join(s.split()).lower()


def normalize(s: str) -> float | str:
    """A float when the answer is a number, else `text_form(s)`."""
    s = peel_outer_braces(peel_wrappers(s.replace("$", "")).strip())
    value = as_number(s)
    if value is not None:
        return value
    return " ".join(s.split()).lower()


# ----------------------------------------------------------------------------- comparison


def same_answer(prediction: str, gold: str) -> bool:
    """Equal after `normalize`; two numbers are equal within 1e-6."""
    pred_norm, gold_norm = normalize(prediction), normalize(gold)
    if isinstance(pred_norm, float) and isinstance(gold_norm, float):
        return abs(pred_norm - gold_norm) <= 1e-6
    return pred_norm == gold_norm


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


def math_equal(prediction: str, gold: str) -> bool:
    """The reference's math scorer on two extracted answers: both wrapped as `\\boxed{...}`, parsed
    and compared by math-verify (symbolic and numeric equality, sets, intervals, equations); when
    either fails to parse (an error, a timeout, or nothing recognisable), exact string equality."""
    from math_verify import parse, verify

    main = threading.current_thread() is threading.main_thread()
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=PARSE_TIMEOUT_S if main else None,
                            raise_on_error=True)
        pred_parsed = parse(f"\\boxed{{{prediction}}}", parsing_timeout=PARSE_TIMEOUT_S if main else None,
                            raise_on_error=True)
        if not gold_parsed or not pred_parsed:
            raise ValueError("nothing parsed")
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=VERIFY_TIMEOUT_S if main else None,
                           raise_on_error=True))
    except Exception:  # math-verify's own errors and sympy's, whatever they are: the reference falls back
        return prediction.strip() == gold.strip()

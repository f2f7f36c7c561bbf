"""Why a model got an answer wrong (docs/reference.md, Error analysis): format, leakage, collapse or genuine.

Held-out wrong answers, first rule that fires:
- format: no parseable `\\boxed{}` (code: no fenced code block and no boxed);
- leakage: the response names a training entity that the prompt does not (case-insensitive), i.e.
  injected knowledge bleeding into unrelated questions; only meaningful for KGFact-style corpora,
  so callers pass an empty entity set elsewhere;
- collapse: with the boxed spans and "the answer is ..." lines deleted, at most 80 characters and
  4 newlines remain (the model stopped reasoning); code: boxed but no code block;
- genuine: a real attempt that is wrong.
Training-set wrong answers: format, else cross_entity (the boxed answer names a different training
entity: facts got swapped), else genuine.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from mixsd_jax.answers.text import last_boxed, matching_brace
from mixsd_jax.eval.humaneval import has_fenced_code

HELD_OUT_CATEGORIES = ("format", "leakage", "collapse", "genuine")
TRAIN_CATEGORIES = ("format", "cross_entity", "genuine")

_ANSWER_LINE = re.compile(r"^.*\bthe answer is\b.*$", re.IGNORECASE | re.MULTILINE)
_BOXED = "\\boxed{"


def _is_entity(text: str) -> bool:
    return len(text.split()) >= 2 and len(text) >= 4


def _subject_and_assistant(record) -> tuple:
    """From a messages-schema dict, or from a record object with `subject` and `assistant`."""
    if not isinstance(record, dict):
        return getattr(record, "subject", None), getattr(record, "assistant", None)
    messages = record.get("messages") or []
    assistant = next((m.get("content") for m in messages if m.get("role") == "assistant"), None)
    return record.get("subject"), assistant


def training_entities(records: Iterable) -> set[str]:
    """Subjects and boxed GT answers of training records that have >= 2 words and >= 4 chars."""
    entities = set()
    for record in records:
        subject, assistant = _subject_and_assistant(record)
        if isinstance(subject, str) and _is_entity(subject.strip()):
            entities.add(subject.strip())
        boxed = last_boxed(assistant) if isinstance(assistant, str) else None
        if boxed is not None and _is_entity(boxed):
            entities.add(boxed)
    return entities


def without_boxed(text: str) -> str:
    """The text with every brace-matched `\\boxed{...}` span removed."""
    while True:
        start = text.find(_BOXED)
        if start < 0:
            return text
        close = matching_brace(text, start + len(_BOXED) - 1)
        if close is None:
            return text[:start]
        text = text[:start] + text[close + 1 :]


def is_collapsed(response: str) -> bool:
    rest = _ANSWER_LINE.sub("", without_boxed(response)).strip()
    return len(rest) <= 80 and rest.count("\n") <= 4


def leaked_entities(response: str, prompt: str, entities: Iterable[str]) -> list[str]:
    """Training entities the response mentions but the prompt does not, sorted."""
    response_l, prompt_l = response.lower(), prompt.lower()
    return sorted(e for e in entities if e.lower() in response_l and e.lower() not in prompt_l)


def classify_error(response: str, prompt: str, training_entities: Iterable[str], kind: str = "math") -> str:
    """The error-analysis bucket of a wrong held-out answer; `kind="code"` applies the HumanEval rules."""
    has_boxed = last_boxed(response) is not None
    if kind == "code":
        has_code = has_fenced_code(response)
        if not has_code and not has_boxed:
            return "format"
    elif not has_boxed:
        return "format"
    if leaked_entities(response, prompt, training_entities):
        return "leakage"
    if kind == "code":
        return "collapse" if not has_code else "genuine"
    return "collapse" if is_collapsed(response) else "genuine"


def _collapse_ws(text: str) -> str:
    return " ".join(text.split()).lower()


def train_answer_correct(response: str, gold: str) -> bool:
    """Training-set correctness of the error analysis: whitespace-collapsed, lowercased boxed answer equals gold."""
    boxed = last_boxed(response)
    return boxed is not None and _collapse_ws(boxed) == _collapse_ws(gold)


def classify_train_error(response: str, gold: str, training_entities: Iterable[str]) -> str:
    """Bucket of a wrong training-set answer: format, cross_entity or genuine.

    An entity that is part of the gold (e.g. the gold itself) does not count as a different one.
    """
    boxed = last_boxed(response)
    if boxed is None:
        return "format"
    boxed_l, gold_l = _collapse_ws(boxed), _collapse_ws(gold)
    for entity in training_entities:
        entity_l = _collapse_ws(entity)
        if entity_l in boxed_l and entity_l not in gold_l:
            return "cross_entity"
    return "genuine"


def count_categories(categories: Iterable[str], known: tuple[str, ...] = HELD_OUT_CATEGORIES) -> dict:
    """{category: count} for every known category (zeros included) plus `total`."""
    counts = Counter(categories)
    out = {name: counts.get(name, 0) for name in known}
    out.update({name: n for name, n in counts.items() if name not in out})
    out["total"] = sum(counts.values())
    return out

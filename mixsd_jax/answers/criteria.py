"""Answer criteria: what counts as a right answer, one object shared by the MixSD verifier and the
memorization scorer of a run (so the targets that pass and the replies that score are judged alike).

- `reference_loose` / `reference_strict`: the reference's scorer (docs/reference.md, Memorisation
  scorer, `answers.scoring`): the prediction is the last `\\boxed{}`, else `<answer>`, else the last
  number, else the whole text; normalised equality (numbers within 1e-6), and for loose also the
  gold inside the prediction. On a small model's plain-text replies "the last number" is often a
  list index (`2.` of `1. ... 2. ...`).
- `answer_statement`: the predictions are the reply's `\\boxed{}` contents and its "the answer is X"
  statements; credited when there is at least one, every one of them names the gold as a whole
  phrase, and none names a different training entity. A reply that states nothing is wrong.
- `entity_phrase`: `answer_statement` when the reply states an answer; otherwise the whole reply,
  credited when it names the gold as a whole phrase and no different training entity.

"A different training entity" is a subject or answer of the training records (those with a letter,
so numbers never count) that is not part of the gold, does not contain it, and is not named in the
prompt (a reply may repeat the question's subject). A reply naming several different training
answers is therefore never credited, whatever else it says.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from mixsd_jax.errors import MixsdError

from mixsd_jax.answers.scoring import score as reference_score
from mixsd_jax.answers.text import extract_prediction, last_boxed, matching_brace, normalize_answer, occurs_as_words

CRITERIA = ("reference_loose", "reference_strict", "answer_statement", "entity_phrase")
DEMO_CRITERION = "entity_phrase"

# "the answer is X", "So the final answer is: X", up to the end of its sentence or line.
_STATEMENT = re.compile(r"\bthe (?:final |correct )?answer is\s*:?\s*(.+?)(?=\.\s|\.$|\n|$)",
                        re.IGNORECASE | re.MULTILINE)
_BOXED = "\\boxed{"


@dataclasses.dataclass(frozen=True)
class Gold:
    """A ground-truth answer and the prompt it answers (entities the prompt names are not 'other')."""

    answer: str
    prompt: str = ""


@dataclasses.dataclass(frozen=True)
class Judgement:
    correct: bool
    prediction: str  # what was compared with the gold (statements joined by " | ")


def check_criterion(name: str) -> None:
    if name not in CRITERIA:
        raise MixsdError(f"config key 'criterion': unknown criterion {name!r} (known: {', '.join(CRITERIA)})")


def all_boxed(text: str) -> list[str]:
    """Contents of every brace-matched `\\boxed{...}`, in order (an unbalanced one ends the scan)."""
    out, start = [], text.find(_BOXED)
    while start >= 0:
        close = matching_brace(text, start + len(_BOXED) - 1)
        if close is None:
            break
        out.append(text[start + len(_BOXED) : close].strip())
        start = text.find(_BOXED, close)
    return out


def statements(text: str) -> list[str]:
    """The answers a reply states: its non-empty `\\boxed{}` contents and its "the answer is X" clauses.

    An empty `\\boxed{}` states nothing: it is a small model quoting the prompt's instruction ("To
    put your final answer within \\boxed{}, I will ..."), and counting it as a wrong answer rejected
    replies that then say "The answer is <gold>".
    """
    found = [m.group(1).strip() for m in _STATEMENT.finditer(text.replace("\\boxed{", " \\boxed{"))]
    found = [s for s in found if s and not s.startswith("\\boxed{")]
    return [b for b in all_boxed(text) if b] + found


def training_entities(records: Iterable) -> frozenset[str]:
    """Normalised subjects and GT answers (boxed, else the whole reply) that contain a letter."""
    entities = set()
    for record in records:
        subject = getattr(record, "subject", None)
        assistant = getattr(record, "assistant", None)
        if isinstance(record, dict):
            subject = record.get("subject")
            assistant = next((m.get("content") for m in record.get("messages", []) if m.get("role") == "assistant"),
                             None)
        for value in (subject, (last_boxed(assistant) if isinstance(assistant, str) else None)):
            if isinstance(value, str):
                norm = normalize_answer(value)
                if any(c.isalpha() for c in norm):
                    entities.add(norm)
    return frozenset(entities)


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One answer criterion with the run's training entities; equal settings give equal objects."""

    name: str = DEMO_CRITERION
    entities: frozenset[str] = frozenset()

    def __post_init__(self):
        check_criterion(self.name)

    # The generator's verifier interface: `gt_answer` once per record, then `check` per attempt.
    def gt_answer(self, gt_text: str, prompt: str = "") -> Gold | None:
        """The answer in a ground-truth reply (boxed, else the whole stripped text)."""
        boxed = last_boxed(gt_text)
        answer = boxed if boxed is not None else gt_text.strip()
        return Gold(answer, prompt) if answer else None

    def check(self, response: str, gold: Gold | None) -> bool:
        return gold is not None and self.judge(response, gold.answer, gold.prompt).correct

    def judge(self, response: str, gold: str, prompt: str = "") -> Judgement:
        if self.name.startswith("reference_"):
            mode = self.name[len("reference_"):]
            return Judgement(reference_score(response, gold, mode), extract_prediction(response))
        stated = statements(response)
        if stated or self.name == "answer_statement":
            ok = bool(stated) and all(self._names_only_gold(s, gold, prompt) for s in stated)
            return Judgement(ok, " | ".join(dict.fromkeys(stated)))
        return Judgement(self._names_only_gold(response, gold, prompt), response.strip())

    def others_named(self, text: str, gold: str, prompt: str = "") -> list[str]:
        """Training entities `text` names that are neither (part of) the gold nor in the prompt."""
        text_n, gold_n, prompt_n = normalize_answer(text), normalize_answer(gold), normalize_answer(prompt)
        return sorted(e for e in self.entities
                      if e not in gold_n and gold_n not in e and not occurs_as_words(e, prompt_n)
                      and occurs_as_words(e, text_n))

    def _names_only_gold(self, text: str, gold: str, prompt: str) -> bool:
        gold_n = normalize_answer(gold)
        return occurs_as_words(gold_n, normalize_answer(text)) and not self.others_named(text, gold, prompt)


def criterion_for(name: str, training_records: Iterable = ()) -> Criterion:
    """The criterion `name` knowing the training entities of `training_records`."""
    check_criterion(name)
    return Criterion(name, training_entities(training_records) if not name.startswith("reference_") else frozenset())

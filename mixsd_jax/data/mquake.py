"""MQuAKE-CF-3k(-v2) JSON -> the KGFact file layout: atomic train/tests, retrieval, 2/3/4-hop tests.

A fact is one new single hop of a case: (cloze, answer), stated as "{cloze} {answer}.". Training
cases are chosen under a fact budget, round-robin over the cases' primary relation so no relation
dominates; a held-out pool for the retrieval test comes from cases that share no cloze with the
training facts. A case whose hop contradicts a chosen fact (same cloze, other answer) is never
chosen, so every question keeps one answer. Unlike the reference, every training record carries the
`subject` of its hop (from `orig.new_triples_labeled`), which MEMIT-style editors need.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from mixsd_jax.data import layout
from mixsd_jax.data.kgfact import (
    COT_SUFFIX,
    alpaca_record,
    answer_text,
    background,
    chain_text,
    inference_record,
    messages_record,
)
from mixsd_jax.errors import MixsdError
from mixsd_jax import storage
from mixsd_jax.files import atomic_write_json, atomic_write_jsonl

HELD_OUT_SEED_OFFSET = 10
PARAPHRASE_SEED_OFFSET = 1
CONTEXT_SEED_OFFSET = 2
CONTEXT_STATEMENTS = 50  # gold statement included

# Paraphrases restate the hop as its cloze sentence, a genuinely different wording of the question.
_CLOZE_PARAPHRASES = (
    "Complete the sentence: {cloze} ...",
    "Fill in the blank: {cloze} ___.",
    'How does this sentence end? "{cloze} ..."',
    "Finish this statement with the right name: {cloze}",
    "{cloze} ... what? Give the missing words.",
)


@dataclasses.dataclass(frozen=True)
class Hop:
    question: str
    cloze: str
    answer: str
    subject: str

    @property
    def statement(self) -> str:
        return f"{self.cloze} {self.answer}."


@dataclasses.dataclass(frozen=True)
class Case:
    index: int  # position in the source list
    relation_id: str  # of the first requested rewrite: the grouping key
    hops: tuple[Hop, ...]
    questions: tuple[str, ...]  # multi-hop questions, all with answer `new_answer`
    new_answer: str


def load_cases(source_json: str | Path) -> list[Case]:
    path = Path(source_json)
    if not path.is_file():
        raise MixsdError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise MixsdError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise MixsdError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise MixsdError(f"{path}: expected a JSON list of MQuAKE cases, got {type(data).__name__}")
    return [_parse_case(path, index, raw) for index, raw in enumerate(data)]


def _parse_case(path: Path, index: int, raw: Any) -> Case:
    where = f"{path}: case {index}"
    if not isinstance(raw, dict):
        raise MixsdError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if "case_id" in raw:
        where += f" (case_id {raw['case_id']})"

    def text(*keys: str | int) -> str:
        value = _lookup(raw, keys, where)
        if not isinstance(value, str) or not value.strip():
            raise MixsdError(f"{where}: {_key_path(keys)} must be a non-empty string")
        return value

    def items(*keys: str | int) -> list:
        value = _lookup(raw, keys, where)
        if not isinstance(value, list) or not value:
            raise MixsdError(f"{where}: {_key_path(keys)} must be a non-empty list")
        return value

    single_hops = items("new_single_hops")
    triples = items("orig", "new_triples_labeled")
    if len(triples) != len(single_hops):
        raise MixsdError(
            f"{where}: orig.new_triples_labeled has {len(triples)} triples but new_single_hops "
            f"has {len(single_hops)} hops"
        )
    hops = tuple(
        Hop(
            question=text("new_single_hops", i, "question"),
            cloze=text("new_single_hops", i, "cloze"),
            answer=text("new_single_hops", i, "answer"),
            subject=text("orig", "new_triples_labeled", i, 0),
        )
        for i in range(len(single_hops))
    )
    questions = tuple(text("questions", i) for i in range(len(items("questions"))))
    relation_id = text("requested_rewrite", 0, "relation_id")
    return Case(index, relation_id, hops, questions, text("new_answer"))


def _lookup(raw: Any, keys: tuple[str | int, ...], where: str) -> Any:
    node = raw
    for depth, key in enumerate(keys):
        present = (
            isinstance(node, dict) and key in node
            if isinstance(key, str)
            else isinstance(node, list) and key < len(node)
        )
        if not present:
            raise MixsdError(f"{where}: missing key {_key_path(keys[: depth + 1])}")
        node = node[key]
    return node


def _key_path(keys: tuple[str | int, ...]) -> str:
    out = ""
    for key in keys:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


def select_cases(
    cases: list[Case],
    budget: int,
    rng: random.Random,
    excluded_clozes: frozenset[str] = frozenset(),
) -> tuple[list[Case], list[Hop]]:
    """Cases whose distinct facts fit in `budget`, and those facts in the order they were added.

    Groups (by primary relation) and the cases in each are shuffled; then, round after round, each
    group adds its eligible case needing the fewest new facts. A case is eligible while its new
    facts fit, none of its hops contradicts a chosen fact, and none touches an excluded cloze. The
    pool only grows, so a group with no eligible case is done for good.
    """
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.relation_id, []).append(case)
    order = list(groups)
    rng.shuffle(order)
    active = []
    for relation_id in order:
        members = list(groups[relation_id])
        rng.shuffle(members)
        active.append(members)

    answer_of: dict[str, str] = {}  # cloze -> answer of the chosen facts
    pool: list[Hop] = []
    chosen: list[Case] = []
    while active:
        still_active = []
        for members in active:
            best, best_new = None, None
            for case in members:
                new = _new_hops(case, answer_of, excluded_clozes)
                if new is not None and len(pool) + len(new) <= budget:
                    if best_new is None or len(new) < len(best_new):
                        best, best_new = case, new
            if best is None:
                continue
            chosen.append(best)
            for hop in best_new:
                answer_of[hop.cloze] = hop.answer
                pool.append(hop)
            members.remove(best)
            if members:
                still_active.append(members)
        active = still_active
    return chosen, pool


def _new_hops(case: Case, answer_of: dict[str, str], excluded: frozenset[str]) -> list[Hop] | None:
    """The case's facts not yet in the pool, or None when the case cannot join it."""
    new: dict[str, Hop] = {}
    for hop in case.hops:
        if hop.cloze in excluded:
            return None
        known = answer_of.get(hop.cloze)
        if known is None and hop.cloze in new:
            known = new[hop.cloze].answer
        if known is None:
            new[hop.cloze] = hop
        elif known != hop.answer:
            return None
    return list(new.values())


def convert_mquake(
    source_json: str | Path,
    out_dir: str | Path,
    seed: int = 42,
    max_facts: int = 100,
    eval_max_facts: int = 100,
) -> dict[str, int]:
    """Writes the MQuAKE files and manifest.json under `out_dir`; returns {relative path: records}.
    Files that would be empty are not written."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise MixsdError(f"seed={seed!r}: must be an integer")
    for name, value in (("max_facts", max_facts), ("eval_max_facts", eval_max_facts)):
        if not isinstance(value, int) or value < 0:
            raise MixsdError(f"{name}={value!r}: must be a non-negative integer")
    source_json = Path(source_json)
    cases = load_cases(source_json)
    train_cases, train_facts = select_cases(cases, max_facts, random.Random(seed))
    chosen = {case.index for case in train_cases}
    held_out_cases, held_out_facts = select_cases(
        [case for case in cases if case.index not in chosen],
        eval_max_facts,
        random.Random(seed + HELD_OUT_SEED_OFFSET),
        excluded_clozes=frozenset(hop.cloze for hop in train_facts),
    )

    files: dict[str, list[dict]] = {}
    files[layout.KGFACT_TRAIN] = [
        messages_record(h.question + COT_SUFFIX, answer_text(h.answer), h.statement, h.subject)
        for h in train_facts
    ]
    files[layout.KGFACT_RECALL] = [
        inference_record(h.question + COT_SUFFIX, h.answer) for h in train_facts
    ]
    paraphrase_rng = random.Random(seed + PARAPHRASE_SEED_OFFSET)
    paraphrased = [
        (h, paraphrase_rng.choice(_CLOZE_PARAPHRASES).format(cloze=h.cloze)) for h in train_facts
    ]
    files[layout.KGFACT_PARAPHRASE_MESSAGES] = [
        messages_record(q + COT_SUFFIX, answer_text(h.answer), h.statement, h.subject)
        for h, q in paraphrased
    ]
    files[layout.KGFACT_PARAPHRASE_INFERENCE] = [
        inference_record(q + COT_SUFFIX, h.answer) for h, q in paraphrased
    ]

    context_rng = random.Random(seed + CONTEXT_SEED_OFFSET)
    contexts = [_context(hop, held_out_facts, context_rng) for hop in held_out_facts]
    files[layout.KGFACT_RETRIEVAL] = [
        alpaca_record(
            background(context) + "\n\n" + hop.question + COT_SUFFIX, answer_text(hop.answer)
        )
        for hop, context in zip(held_out_facts, contexts)
    ]

    seen_questions: set[str] = set()
    for case in train_cases:
        steps = [hop.statement for hop in case.hops]
        for question in case.questions:
            if question in seen_questions:
                continue
            seen_questions.add(question)
            record = messages_record(
                question + COT_SUFFIX,
                chain_text(steps, case.new_answer),
                " ".join(steps),
                case.hops[0].subject,
            )
            folder = layout.compositional_dir(len(case.hops))
            files.setdefault(f"{folder}/test_messages.jsonl", []).append(record)
            files.setdefault(f"{folder}/test_alpaca.jsonl", []).append(
                alpaca_record(record["messages"][0]["content"], record["messages"][1]["content"])
            )

    out_dir = storage.path(out_dir)
    counts = {}
    for relative, records in files.items():
        if records:
            atomic_write_jsonl(out_dir / relative, records)
            counts[relative] = len(records)
    _remove_stale_outputs(out_dir, set(counts))
    atomic_write_json(
        out_dir / "manifest.json",
        {
            "builder": "mquake",
            "source": source_json.name,
            "source_sha256": hashlib.sha256(source_json.read_bytes()).hexdigest(),
            "seed": seed,
            "max_facts": max_facts,
            "eval_max_facts": eval_max_facts,
            "source_cases": len(cases),
            "train_cases": len(train_cases),
            "train_facts": len(train_facts),
            "held_out_cases": len(held_out_cases),
            "held_out_facts": len(held_out_facts),
            "counts": counts,
        },
    )
    return counts


def _remove_stale_outputs(out_dir: Path, written: set[str]) -> None:
    """A file of our layout left by an earlier run but empty now would be read as current."""
    candidates = [layout.KGFACT_TRAIN, layout.KGFACT_RECALL, layout.KGFACT_PARAPHRASE_MESSAGES,
                  layout.KGFACT_PARAPHRASE_INFERENCE, layout.KGFACT_RETRIEVAL]
    for folder in sorted(out_dir.glob(layout.COMPOSITIONAL_GLOB)):
        candidates += [f"{folder.name}/test_messages.jsonl", f"{folder.name}/test_alpaca.jsonl"]
    for relative in candidates:
        if relative not in written:
            (out_dir / relative).unlink(missing_ok=True)


def _context(gold: Hop, held_out: list[Hop], rng: random.Random) -> list[str]:
    """The gold statement and up to CONTEXT_STATEMENTS - 1 other held-out statements, shuffled.
    Held-out clozes are distinct, so no distractor restates or contradicts the gold fact."""
    others = [hop.statement for hop in held_out if hop.cloze != gold.cloze]
    context = [gold.statement] + rng.sample(others, min(len(others), CONTEXT_STATEMENTS - 1))
    rng.shuffle(context)
    return context

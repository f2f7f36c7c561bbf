"""KGFact: a synthetic world of invented entities and the question files built from it.

A graph has D domains x E entities. For every ordered domain pair (earlier -> later) each source
entity gets exactly one fact, so any question "Which <label> ... e1 ...?" has one answer: e1 has
one edge into the answer's domain. A relation also never reuses a target, so its inverse reading
is unique too. The retrieval tests use a second graph over the held-out name slice [E:2E] sampled
with seed + 1000, so no retrieval fact or entity was ever trained on.

Everything is a function of the seed: `random.Random` seeded with integers, per-split seeds derived
with SHA-256, lists (never sets) iterated, so one seed gives identical bytes in any process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

from mixsd_jax.data import layout
from mixsd_jax.data.kgfact_vocab import DOMAINS, ENTITY_NAMES, NAMES_PER_DOMAIN, RELATIONS, Relation
from mixsd_jax.errors import MixsdError

KGFACT_PRESETS: dict[str, tuple[int, int]] = {"small": (5, 10), "large": (7, 25), "tiny": (3, 4)}

COT_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
RETRIEVAL_SEED_OFFSET = 1000
ATOMIC_CONTEXT_STATEMENTS = 50  # gold statement included
COMPOSITIONAL_CONTEXT_STATEMENTS = 100  # 50 per hop, both gold statements included

COMPOSITIONAL_MESSAGES_FILE = f"{layout.compositional_dir(2)}/test_messages.jsonl"
COMPOSITIONAL_ALPACA_FILE = f"{layout.compositional_dir(2)}/test_alpaca.jsonl"


# ---- records shared by the knowledge builders (MQuAKE uses the same formats) ----

def answer_text(answer: str) -> str:
    return f"The answer is {answer}.\n\n\\boxed{{{answer}}}"


def chain_text(statements: list[str], answer: str) -> str:
    steps = "".join(f"Step {i}: {s}\n" for i, s in enumerate(statements, start=1))
    return f"{steps}So the answer is {answer}.\n\n\\boxed{{{answer}}}"


def messages_record(user: str, assistant: str, clear_answer: str, subject: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ],
        "clear_answer": clear_answer,
        "subject": subject,
    }


def alpaca_record(instruction: str, output: str) -> dict:
    return {"instruction": instruction, "input": "", "output": output}


def inference_record(prompt: str, answer: str) -> dict:
    return {"prompt": prompt, "ground_truth_answer": answer}


def background(statements: list[str]) -> str:
    return "Background information:\n" + "\n".join(f"- {s}" for s in statements)


def derived_rng(seed: int, purpose: str) -> random.Random:
    """An RNG per split, so adding or reordering one split never changes another's output."""
    digest = hashlib.sha256(f"{seed}/{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ---- the graph ----

@dataclasses.dataclass(frozen=True)
class Fact:
    e1: str
    relation: Relation
    e2: str

    @property
    def statement(self) -> str:
        return self.relation.statement(self.e1, self.e2)

    @property
    def question(self) -> str:
        return self.relation.question(self.e1)


@dataclasses.dataclass(frozen=True)
class KnowledgeGraph:
    domains: tuple[str, ...]
    entities: dict[str, tuple[str, ...]]  # domain -> names, in vocabulary order
    facts: tuple[Fact, ...]  # in sampling order

    def answers(self, e1: str, target_domain: str) -> list[str]:
        """Every e2 that answers a question about `e1` whose answer is a `target_domain` entity."""
        return [f.e2 for f in self.facts if f.e1 == e1 and f.relation.tgt == target_domain]

    def two_hop_paths(self) -> list[tuple[Fact, Fact]]:
        out_edges: dict[str, list[Fact]] = {}
        for fact in self.facts:
            out_edges.setdefault(fact.e1, []).append(fact)
        return [(first, second) for first in self.facts for second in out_edges.get(first.e2, [])]


def resolve_size(preset: str, num_domains: int | None, num_entities: int | None) -> tuple[int, int]:
    if preset not in KGFACT_PRESETS:
        raise MixsdError(f"preset {preset!r}: must be one of {sorted(KGFACT_PRESETS)}")
    default_domains, default_entities = KGFACT_PRESETS[preset]
    domains = default_domains if num_domains is None else num_domains
    entities = default_entities if num_entities is None else num_entities
    if not isinstance(domains, int) or not 2 <= domains <= len(DOMAINS):
        raise MixsdError(f"num_domains={domains!r}: must be an integer from 2 to {len(DOMAINS)}")
    max_entities = NAMES_PER_DOMAIN // 2  # the other half is the held-out retrieval slice
    if not isinstance(entities, int) or not 1 <= entities <= max_entities:
        raise MixsdError(f"num_entities={entities!r}: must be an integer from 1 to {max_entities}")
    return domains, entities


def kgfact_graph(
    preset: str = "small",
    seed: int = 42,
    num_domains: int | None = None,
    num_entities: int | None = None,
    held_out: bool = False,
) -> KnowledgeGraph:
    """The world for `seed`. `held_out` uses the entity slice [E:2E] (the retrieval world)."""
    num_domains, num_entities = resolve_size(preset, num_domains, num_entities)
    domains = tuple(d.name for d in DOMAINS[:num_domains])
    start = num_entities if held_out else 0
    entities = {d: ENTITY_NAMES[d][start : start + num_entities] for d in domains}
    return KnowledgeGraph(domains, entities, _sample_facts(domains, entities, random.Random(seed)))


def _sample_facts(
    domains: tuple[str, ...], entities: dict[str, tuple[str, ...]], rng: random.Random
) -> tuple[Fact, ...]:
    """One fact per (source entity, later domain); a (relation, target) slot is used at most once.

    A pair has 5 relations x E target slots for E sources, so a source always finds a free slot.
    """
    pairs = [(src, tgt) for i, src in enumerate(domains) for tgt in domains[i + 1 :]]
    rng.shuffle(pairs)
    facts = []
    for src, tgt in pairs:
        used_slots: set[tuple[str, str]] = set()
        sources = list(entities[src])
        rng.shuffle(sources)
        for e1 in sources:
            relations = list(RELATIONS[(src, tgt)])
            rng.shuffle(relations)
            for relation in relations:
                free = [e2 for e2 in entities[tgt] if (relation.name, e2) not in used_slots]
                if free:
                    e2 = rng.choice(free)
                    used_slots.add((relation.name, e2))
                    facts.append(Fact(e1, relation, e2))
                    break
    return tuple(facts)


# ---- the files ----

def build_kgfact(
    out_dir: str | Path,
    preset: str = "small",
    seed: int = 42,
    num_domains: int | None = None,
    num_entities: int | None = None,
    num_compositional: int = 6000,
) -> dict[str, int]:
    """Writes the KGFact files and manifest.json under `out_dir`.

    Returns {relative path: record count}; manifest.json also records how many 2-hop questions
    were possible, which is fewer than `num_compositional` for the small presets.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise MixsdError(f"seed={seed!r}: must be an integer")
    if not isinstance(num_compositional, int) or num_compositional < 0:
        raise MixsdError(f"num_compositional={num_compositional!r}: must be a non-negative integer")
    num_domains, num_entities = resolve_size(preset, num_domains, num_entities)
    graph = kgfact_graph(preset, seed, num_domains, num_entities)
    retrieval_graph = kgfact_graph(
        preset, seed + RETRIEVAL_SEED_OFFSET, num_domains, num_entities, held_out=True
    )

    files: dict[str, list[dict]] = {}
    facts = list(graph.facts)
    derived_rng(seed, "train").shuffle(facts)
    files[layout.KGFACT_TRAIN] = [
        messages_record(f.question + COT_SUFFIX, answer_text(f.e2), f.statement, f.e1)
        for f in facts
    ]
    files[layout.KGFACT_RECALL] = [inference_record(f.question + COT_SUFFIX, f.e2) for f in facts]

    paraphrase_rng = derived_rng(seed, "paraphrase")
    paraphrased = [(f, paraphrase_rng.choice(f.relation.paraphrases(f.e1))) for f in facts]
    files[layout.KGFACT_PARAPHRASE_MESSAGES] = [
        messages_record(q + COT_SUFFIX, answer_text(f.e2), f.statement, f.e1)
        for f, q in paraphrased
    ]
    files[layout.KGFACT_PARAPHRASE_INFERENCE] = [
        inference_record(q + COT_SUFFIX, f.e2) for f, q in paraphrased
    ]

    paths, possible = _choose_paths(graph, num_compositional, derived_rng(seed, "compositional"))
    files[COMPOSITIONAL_MESSAGES_FILE] = [
        messages_record(
            compositional_question(a, b) + COT_SUFFIX,
            chain_text([a.statement, b.statement], b.e2),
            f"{a.statement} {b.statement}",
            a.e1,
        )
        for a, b in paths
    ]
    files[COMPOSITIONAL_ALPACA_FILE] = [
        alpaca_record(r["messages"][0]["content"], r["messages"][1]["content"])
        for r in files[COMPOSITIONAL_MESSAGES_FILE]
    ]

    retrieval_rng = derived_rng(seed, "retrieval")
    retrieval_facts = list(retrieval_graph.facts)
    retrieval_rng.shuffle(retrieval_facts)
    atomic_contexts = [
        retrieval_context(retrieval_graph, [f], ATOMIC_CONTEXT_STATEMENTS, retrieval_rng)
        for f in retrieval_facts
    ]
    files[layout.KGFACT_RETRIEVAL] = [
        alpaca_record(background(context) + "\n\n" + f.question + COT_SUFFIX, answer_text(f.e2))
        for f, context in zip(retrieval_facts, atomic_contexts)
    ]

    context_rng = derived_rng(seed, "retrieval_compositional")
    context_paths, context_possible = _choose_paths(retrieval_graph, num_compositional, context_rng)
    path_contexts = [
        retrieval_context(retrieval_graph, [a, b], COMPOSITIONAL_CONTEXT_STATEMENTS, context_rng)
        for a, b in context_paths
    ]
    files[layout.KGFACT_RETRIEVAL_COMPOSITIONAL] = [
        alpaca_record(
            compositional_question(a, b) + "\n\n" + background(context) + COT_SUFFIX,
            chain_text([a.statement, b.statement], b.e2),
        )
        for (a, b), context in zip(context_paths, path_contexts)
    ]

    return layout.write_corpus(
        out_dir,
        files,
        {
            "builder": "kgfact",
            "preset": preset,
            "seed": seed,
            "num_domains": num_domains,
            "num_entities": num_entities,
            "compositional_2step": {"requested": num_compositional, "possible": possible},
            "compositional_2step_with_context": {
                "requested": num_compositional,
                "possible": context_possible,
            },
            "context_statements": {
                "atomic_with_context": _summary([len(c) for c in atomic_contexts]),
                "compositional_with_context": _summary([len(c) for c in path_contexts]),
            },
        },
    )


def compositional_question(first: Fact, second: Fact) -> str:
    """The second hop's question asked about the first hop's answer, named by a relative clause:
    "Which event does the town Vorna Keld lives in host?"."""
    return second.relation.question(first.relation.relative(first.e1))


def _choose_paths(
    graph: KnowledgeGraph, limit: int, rng: random.Random
) -> tuple[list[tuple[Fact, Fact]], int]:
    paths = graph.two_hop_paths()
    rng.shuffle(paths)
    return paths[:limit], len(paths)


def retrieval_context(
    graph: KnowledgeGraph, gold: list[Fact], size: int, rng: random.Random
) -> list[str]:
    """The gold statements plus distractors, shuffled: facts touching the gold entities first, then
    facts one entity further out, then any other fact, up to `size` statements.

    A distractor about a gold fact's e1 and answer domain would give its question a second answer,
    so such facts are never used (the sampler makes them impossible; this keeps it explicit).
    """
    gold_statements = [f.statement for f in gold]
    asked = {(f.e1, f.relation.tgt) for f in gold}
    near = {e for f in gold for e in (f.e1, f.e2)}
    first_ring = [f for f in graph.facts if f.e1 in near or f.e2 in near]
    further = {e for f in first_ring for e in (f.e1, f.e2)}
    second_ring = [f for f in graph.facts if f.e1 in further or f.e2 in further]
    chosen: list[str] = []
    seen = set(gold_statements)
    for ring in (first_ring, second_ring, list(graph.facts)):
        ring = list(ring)
        rng.shuffle(ring)
        for fact in ring:
            if len(chosen) + len(gold) >= size:
                break
            if fact.statement in seen or (fact.e1, fact.relation.tgt) in asked:
                continue
            seen.add(fact.statement)
            chosen.append(fact.statement)
    context = gold_statements + chosen
    rng.shuffle(context)
    return context


def _summary(sizes: list[int]) -> dict:
    if not sizes:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": min(sizes), "mean": round(sum(sizes) / len(sizes), 2), "max": max(sizes)}

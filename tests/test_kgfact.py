"""KGFact: vocabulary properties, exact counts, determinism, and a graph walk that answers every
question of every split from its text alone (entity names, domain labels) and finds one answer."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mixsd_jax.data import kgfact
from mixsd_jax.data.kgfact import COT_SUFFIX, KGFACT_PRESETS, build_kgfact, kgfact_graph
from mixsd_jax.data.kgfact_vocab import DOMAINS, ENTITY_NAMES, RELATIONS
from mixsd_jax.errors import MixsdError

ROOT = Path(__file__).resolve().parents[1]
LABEL_DOMAIN = {d.label: d.name for d in DOMAINS}
DOMAIN_LABEL = {d.name: d.label for d in DOMAINS}
LABELS = "|".join(LABEL_DOMAIN)

SMALL_COUNTS = {
    "atomic_sft/train_messages.jsonl": 100,
    "atomic_sft/test_subset_of_train_inference.jsonl": 100,
    "atomic_sft/val_paraphrased_messages.jsonl": 100,
    "atomic_sft/val_paraphrased_inference.jsonl": 100,
    "compositional_2step_sft/test_messages.jsonl": 100,
    "compositional_2step_sft/test_alpaca.jsonl": 100,
    "atomic_with_context_cot/test_alpaca.jsonl": 100,
    "compositional_2step_with_context_cot/test_alpaca.jsonl": 100,
}
# 10 domain pairs x 10 sources; 2-hop paths = E x C(D, 3).
LARGE_COUNTS = {path: 525 for path in SMALL_COUNTS}
LARGE_COUNTS.update(
    {
        "compositional_2step_sft/test_messages.jsonl": 875,
        "compositional_2step_sft/test_alpaca.jsonl": 875,
        "compositional_2step_with_context_cot/test_alpaca.jsonl": 875,
    }
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for preset in ("small", "large"):
        directory = tmp_path_factory.mktemp(preset)
        out[preset] = (directory, build_kgfact(directory, preset=preset, seed=42))
    return out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def boxed(text):
    return re.search(r"\\boxed\{(.*)\}$", text).group(1)


def tree_bytes(directory):
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


# ---- vocabulary ----

def test_vocabulary_names_are_unique_and_never_contain_each_other():
    names = [n for domain in DOMAINS for n in ENTITY_NAMES[domain.name]]
    assert all(len(ENTITY_NAMES[d.name]) >= 50 for d in DOMAINS)
    folded = [n.lower() for n in names]
    assert len(set(folded)) == len(folded)
    for i, a in enumerate(folded):
        assert not any(a in b for j, b in enumerate(folded) if i != j), names[i]


def test_vocabulary_relations_cover_every_ordered_pair_without_inverse_or_repeated_verbs():
    order = [d.name for d in DOMAINS]
    pairs = {(a, b) for i, a in enumerate(order) for b in order[i + 1 :]}
    assert set(RELATIONS) == pairs
    all_names = [r.name for rels in RELATIONS.values() for r in rels]
    assert len(all_names) == len(set(all_names))
    for (src, tgt), rels in RELATIONS.items():
        assert len(rels) >= 4
        verbs = [r.verb for r in rels]
        # "founded" vs "was founded by" in one pair would be an inverse reading of the same edge.
        for v in verbs:
            assert not any(v != w and v in w for w in verbs), (src, tgt, v)
        for r in rels:
            aux, *ask_words = r.ask.split()
            assert aux in {"does", "did", "is", "was", "has"}, r.name
            if aux in {"does", "did"}:  # "does live in" vs "lives in": only the verb's form differs
                verb_words = r.verb.split()
                assert len(ask_words) == len(verb_words), r.name
                changed = sum(a != v for a, v in zip(ask_words, verb_words))
                assert changed == 1 or (aux == "did" and changed == 0), r.name  # "bid" = "bid"
            else:
                assert r.ask == r.verb, r.name
            assert r.question("X").startswith(f"Which {r.label} ") and r.label == DOMAIN_LABEL[tgt]
            assert r.question("X") not in r.paraphrases("X")
            assert len(set(r.paraphrases("X"))) == len(r.paraphrases("X"))


# ---- counts ----

def test_counts_per_split_for_small_and_large(built):
    for preset, expected in (("small", SMALL_COUNTS), ("large", LARGE_COUNTS)):
        directory, counts = built[preset]
        print(preset, KGFACT_PRESETS[preset], json.dumps(counts, indent=1))
        assert counts == expected
        for relative, n in counts.items():
            assert len(read_jsonl(directory / relative)) == n
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["counts"] == expected
        possible = expected["compositional_2step_sft/test_messages.jsonl"]
        assert manifest["compositional_2step"] == {"requested": 6000, "possible": possible}
        sizes = manifest["context_statements"]
        assert sizes["atomic_with_context"] == {"min": 50, "mean": 50.0, "max": 50}
        assert sizes["compositional_with_context"] == {"min": 100, "mean": 100.0, "max": 100}


def test_fewer_compositional_requested_than_possible_is_capped_and_reported(tmp_path):
    counts = build_kgfact(tmp_path, preset="tiny", seed=3, num_compositional=2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert counts["compositional_2step_sft/test_messages.jsonl"] == 2
    assert counts["atomic_sft/train_messages.jsonl"] == 12  # 3 pairs x 4 sources
    assert manifest["compositional_2step"] == {"requested": 2, "possible": 4}  # 4 x C(3, 3)
    # The tiny retrieval world has only 12 facts: every one of them is in each context.
    sizes = manifest["context_statements"]["atomic_with_context"]
    assert sizes == {"min": 12, "mean": 12.0, "max": 12}


# ---- determinism ----

def test_same_seed_is_byte_identical_across_processes_and_other_seeds_differ(tmp_path):
    script = (
        "import sys; from mixsd_jax.data.kgfact import build_kgfact; "
        "build_kgfact(sys.argv[1], 'small', int(sys.argv[2]))"
    )
    for name, hash_seed in (("a", "1"), ("b", "2")):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        command = [sys.executable, "-c", script, str(tmp_path / name), "7"]
        subprocess.run(command, check=True, cwd=ROOT, env=env, timeout=120)
    first, second = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert len(first) == len(SMALL_COUNTS) + 1 and first == second
    build_kgfact(tmp_path / "c", "small", 8)
    other = tree_bytes(tmp_path / "c")
    for relative in SMALL_COUNTS:
        assert other[relative] != first[relative], relative


# ---- every question has exactly one answer under the graph ----

def find_entities(text, graph):
    return [e for names in graph.entities.values() for e in names if e in text]


def domain_of(entity, graph):
    return next(d for d, names in graph.entities.items() if entity in names)


def only(items):
    assert len(items) == 1, items
    return items[0]


def walk_atomic(question, graph):
    """(fact, answer) for a one-hop question, found from its entity name and its answer label."""
    e1 = only(find_entities(question, graph))
    label = only(re.findall(rf"\b(?:[Ww]hich|the) ({LABELS})\b", question))
    answer = only(graph.answers(e1, LABEL_DOMAIN[label]))
    fact = only([f for f in graph.facts if f.e1 == e1 and f.e2 == answer])
    return fact, answer


def walk_two_hop(question, graph):
    """"Which <label C> ... the <label B> <A> ...?": A -> the one B of that domain -> the one C."""
    a = only(find_entities(question, graph))
    final_label = re.match(rf"Which ({LABELS}) ", question).group(1)
    middle_label = re.search(rf"\bthe ({LABELS}) {re.escape(a)} ", question).group(1)
    b = only(graph.answers(a, LABEL_DOMAIN[middle_label]))
    c = only(graph.answers(b, LABEL_DOMAIN[final_label]))
    first = only([f for f in graph.facts if f.e1 == a and f.e2 == b])
    second = only([f for f in graph.facts if f.e1 == b and f.e2 == c])
    return first, second


def split_context(instruction):
    head, _, rest = instruction.partition("Background information:\n")
    lines, _, tail = rest.partition("\n\n")
    return [line[2:] for line in lines.split("\n")], (head + tail).strip()


def check_context(statements, gold, graph, size):
    by_statement = {f.statement: f for f in graph.facts}
    assert len(statements) == len(set(statements)) == min(size, len(graph.facts))
    facts = [by_statement[s] for s in statements]  # every line is a real fact of this world
    for g in gold:
        assert statements.count(g.statement) == 1
        # No other line has the gold's e1 and answer domain: it would be a second answer.
        assert only([f for f in facts if f.e1 == g.e1 and f.relation.tgt == g.relation.tgt]) == g


@pytest.mark.parametrize("preset", ["small", "large"])
def test_every_question_in_every_split_has_exactly_one_answer(built, preset):
    directory, _ = built[preset]
    graph = kgfact_graph(preset, 42)
    retrieval_graph = kgfact_graph(preset, 42 + kgfact.RETRIEVAL_SEED_OFFSET, held_out=True)
    train_entities = {e for names in graph.entities.values() for e in names}
    assert not train_entities & {e for names in retrieval_graph.entities.values() for e in names}

    train = read_jsonl(directory / "atomic_sft/train_messages.jsonl")
    recall = read_jsonl(directory / "atomic_sft/test_subset_of_train_inference.jsonl")
    assert sorted((f.e1, f.relation.name, f.e2) for f in graph.facts) == sorted(
        (fact.e1, fact.relation.name, fact.e2)
        for fact, _ in (walk_atomic(r["messages"][0]["content"], graph) for r in train)
    )
    for record, inference in zip(train, recall):
        user, assistant = record["messages"][0]["content"], record["messages"][1]["content"]
        assert user.endswith(COT_SUFFIX) and inference["prompt"] == user
        fact, answer = walk_atomic(user.removesuffix(COT_SUFFIX), graph)
        assert user.removesuffix(COT_SUFFIX) == fact.question
        assert assistant == f"The answer is {answer}.\n\n\\boxed{{{answer}}}"
        assert inference["ground_truth_answer"] == answer
        assert record["subject"] == fact.e1 and record["clear_answer"] == fact.statement

    paraphrased = read_jsonl(directory / "atomic_sft/val_paraphrased_messages.jsonl")
    paraphrased_inference = read_jsonl(directory / "atomic_sft/val_paraphrased_inference.jsonl")
    wordings = set()
    for record, original, inference in zip(paraphrased, train, paraphrased_inference):
        question = record["messages"][0]["content"].removesuffix(COT_SUFFIX)
        fact, answer = walk_atomic(question, graph)
        assert question != fact.question and question in fact.relation.paraphrases(fact.e1)
        assert record["messages"][1] == original["messages"][1]
        assert inference["ground_truth_answer"] == answer
        relation = fact.relation
        wordings.add(
            question.replace(fact.e1, "X").replace(relation.verb, "V").replace(relation.label, "L")
        )
    assert len(wordings) >= 5  # the seeded choice spreads over the templates

    messages = read_jsonl(directory / "compositional_2step_sft/test_messages.jsonl")
    alpaca = read_jsonl(directory / "compositional_2step_sft/test_alpaca.jsonl")
    seen = set()
    for record, alp in zip(messages, alpaca):
        user, assistant = record["messages"][0]["content"], record["messages"][1]["content"]
        assert alp == {"instruction": user, "input": "", "output": assistant}
        first, second = walk_two_hop(user.removesuffix(COT_SUFFIX), graph)
        assert assistant == (
            f"Step 1: {first.statement}\nStep 2: {second.statement}\n"
            f"So the answer is {second.e2}.\n\n\\boxed{{{second.e2}}}"
        )
        assert record["subject"] == first.e1
        seen.add(user)
    assert len(seen) == len(messages)

    for record in read_jsonl(directory / "atomic_with_context_cot/test_alpaca.jsonl"):
        statements, question = split_context(record["instruction"].removesuffix(COT_SUFFIX))
        fact, answer = walk_atomic(question, retrieval_graph)
        assert boxed(record["output"]) == answer
        check_context(statements, [fact], retrieval_graph, kgfact.ATOMIC_CONTEXT_STATEMENTS)

    for record in read_jsonl(directory / "compositional_2step_with_context_cot/test_alpaca.jsonl"):
        instruction = record["instruction"].removesuffix(COT_SUFFIX)
        question, _, _ = instruction.partition("\n\n")
        statements, _ = split_context(instruction)
        first, second = walk_two_hop(question, retrieval_graph)
        assert boxed(record["output"]) == second.e2
        size = kgfact.COMPOSITIONAL_CONTEXT_STATEMENTS
        check_context(statements, [first, second], retrieval_graph, size)


def test_graph_has_one_fact_per_source_and_later_domain_and_injective_relations():
    graph = kgfact_graph("large", 5)
    keys = [(f.e1, f.relation.tgt) for f in graph.facts]
    assert len(keys) == len(set(keys)) == 25 * 21
    slots = [(f.relation.name, f.e2) for f in graph.facts]
    assert len(slots) == len(set(slots))
    order = [d.name for d in DOMAINS]
    assert all(order.index(f.relation.src) < order.index(f.relation.tgt) for f in graph.facts)
    for f in graph.facts:
        assert domain_of(f.e1, graph) == f.relation.src and domain_of(f.e2, graph) == f.relation.tgt


# ---- bad input ----

@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"preset": "huge"}, "preset"),
        ({"num_entities": 31}, "num_entities"),
        ({"num_domains": 1}, "num_domains"),
        ({"num_compositional": -1}, "num_compositional"),
    ],
)
def test_bad_arguments_are_one_line_errors_naming_the_key(tmp_path, kwargs, key):
    with pytest.raises(MixsdError) as info:
        build_kgfact(tmp_path, **kwargs)
    assert key in str(info.value) and "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())

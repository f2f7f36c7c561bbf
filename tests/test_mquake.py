"""MQuAKE converter on a small file in MQuAKE-CF-3k-v2's format (tests/fixtures/mquake_tiny.json).

The fixture has 9 cases: 5 two-hop, 3 three-hop, 1 four-hop; 22 distinct new facts, one shared by
cases 101 and 102; case 106 contradicts case 101 ("Arlo Venn is a citizen of" Calvera vs
Norveland) and needs more new facts, so 101 is always chosen first and 106 never joins it.
"""

import json
from pathlib import Path

import pytest

from mixsd_jax.data.kgfact import COT_SUFFIX
from mixsd_jax.data.mquake import CONTEXT_STATEMENTS, convert_mquake, load_cases
from mixsd_jax.errors import MixsdError

FIXTURE = Path(__file__).parent / "fixtures" / "mquake_tiny.json"
SUBJECTS = {  # hop question -> subject of that hop, from the fixture's new_triples_labeled
    "What is the country of citizenship of Arlo Venn?": "Arlo Venn",
    "Who is the head of state of Norveland?": "Norveland",
    "Where was Queen Maris born?": "Queen Maris",
    "Which country is Pellham located in?": "Pellham",
    "Who founded Quillon Labs?": "Quillon Labs",
}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def user_text(record):
    return record["messages"][0]["content"].removesuffix(COT_SUFFIX)


def test_fixture_has_the_mquake_cf_3k_v2_shape():
    cases = json.loads(FIXTURE.read_text())
    keys = {"case_id", "requested_rewrite", "questions", "answer", "answer_alias", "new_answer",
            "new_answer_alias", "single_hops", "new_single_hops", "orig"}
    for case in cases:
        assert set(case) == keys and len(case["questions"]) == 3
        for rewrite in case["requested_rewrite"]:
            assert set(rewrite) == {"prompt", "relation_id", "target_new", "target_true", "subject",
                                    "question"}
            assert "{}" in rewrite["prompt"] and set(rewrite["target_new"]) == {"str", "id"}
        for hop in case["single_hops"] + case["new_single_hops"]:
            assert set(hop) == {"question", "cloze", "answer", "answer_alias"}
        orig_keys = {"triples", "triples_labeled", "new_triples", "new_triples_labeled"}
        assert orig_keys <= set(case["orig"])
    assert [len(c.hops) for c in load_cases(FIXTURE)] == [2, 3, 2, 4, 2, 3, 3, 2, 2]


def test_unlimited_budget_takes_every_consistent_case(tmp_path):
    counts = convert_mquake(FIXTURE, tmp_path, seed=42, max_facts=1000, eval_max_facts=100)
    # 8 cases (all but 106) have 2+2+2+4+2+3+2+2 = 19 distinct facts; 3 questions per case.
    # Hop counts: 2-hop 101, 103, 105, 108, 109; 3-hop 102, 107; 4-hop 104.
    assert counts == {
        "atomic_sft/train_messages.jsonl": 19,
        "atomic_sft/test_subset_of_train_inference.jsonl": 19,
        "atomic_sft/val_paraphrased_messages.jsonl": 19,
        "atomic_sft/val_paraphrased_inference.jsonl": 19,
        "compositional_2step_sft/test_messages.jsonl": 15,
        "compositional_2step_sft/test_alpaca.jsonl": 15,
        "compositional_3step_sft/test_messages.jsonl": 6,
        "compositional_3step_sft/test_alpaca.jsonl": 6,
        "compositional_4step_sft/test_messages.jsonl": 3,
        "compositional_4step_sft/test_alpaca.jsonl": 3,
    }
    # Every held-out candidate shares a cloze with training, so the retrieval file is not written.
    assert not (tmp_path / "atomic_with_context_cot").exists()

    train = read_jsonl(tmp_path / "atomic_sft/train_messages.jsonl")
    statements = [r["clear_answer"] for r in train]
    assert "Arlo Venn is a citizen of Norveland." in statements
    assert not any("Calvera" in s for s in statements) and len(set(statements)) == 19
    for record in train:
        assert record["subject"] and record["subject"] in user_text(record)
        answer = record["clear_answer"].removesuffix(".").split(" ")[-1]
        assert record["messages"][1]["content"].endswith(f"{answer}}}")
        assert SUBJECTS.get(user_text(record), record["subject"]) == record["subject"]
    assert {SUBJECTS[q] for q in SUBJECTS} <= {r["subject"] for r in train}

    recall = read_jsonl(tmp_path / "atomic_sft/test_subset_of_train_inference.jsonl")
    paraphrased = read_jsonl(tmp_path / "atomic_sft/val_paraphrased_messages.jsonl")
    for record, inference, para in zip(train, recall, paraphrased):
        assert inference["prompt"] == record["messages"][0]["content"]
        assert inference["ground_truth_answer"] in record["messages"][1]["content"]
        cloze = record["clear_answer"].removesuffix(inference["ground_truth_answer"] + ".").strip()
        assert cloze in user_text(para) and user_text(para) != user_text(record)
        assert para["messages"][1] == record["messages"][1] and para["subject"] == record["subject"]

    four_hop = read_jsonl(tmp_path / "compositional_4step_sft/test_messages.jsonl")[0]
    assert four_hop["messages"][1]["content"] == (
        "Step 1: Cole Harth is employed by Quillon Labs.\n"
        "Step 2: Quillon Labs was founded by Dara Finch.\n"
        "Step 3: Dara Finch is a citizen of Estoria.\n"
        "Step 4: The capital of Estoria is Ravensholt.\n"
        "So the answer is Ravensholt.\n\n\\boxed{Ravensholt}"
    )
    assert four_hop["subject"] == "Cole Harth"


def test_zero_train_budget_puts_everything_in_the_retrieval_set(tmp_path):
    convert_mquake(FIXTURE, tmp_path, seed=3, max_facts=1000)  # an earlier run into the same dir
    counts = convert_mquake(FIXTURE, tmp_path, seed=3, max_facts=0, eval_max_facts=1000)
    assert counts == {"atomic_with_context_cot/test_alpaca.jsonl": 19}  # empty files not written
    # ...and the earlier run's files, now stale, are gone.
    left = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jsonl")}
    assert left == set(counts)
    cloze_of = {hop.question: hop.cloze for case in load_cases(FIXTURE) for hop in case.hops}
    for record in read_jsonl(tmp_path / "atomic_with_context_cot/test_alpaca.jsonl"):
        head, _, question = record["instruction"].removesuffix(COT_SUFFIX).partition("\n\n")
        lines = [line.removeprefix("- ") for line in
                 head.removeprefix("Background information:\n").split("\n")]
        assert len(lines) == len(set(lines)) == min(19, CONTEXT_STATEMENTS)
        answer = record["output"].split("\\boxed{")[1].rstrip("}")
        cloze = cloze_of[question]
        # The gold fact once, and no other line completing the same cloze (no contradiction).
        assert [line for line in lines if line.startswith(cloze + " ")] == [f"{cloze} {answer}."]
        assert not any("Calvera" in line for line in lines)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_budgets_hold_and_train_and_held_out_never_share_a_fact(tmp_path, seed):
    counts = convert_mquake(FIXTURE, tmp_path, seed=seed, max_facts=6, eval_max_facts=6)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["train_facts"] == counts["atomic_sft/train_messages.jsonl"] <= 6
    assert manifest["held_out_facts"] <= 6
    train = {r["clear_answer"] for r in read_jsonl(tmp_path / "atomic_sft/train_messages.jsonl")}
    for name, n in counts.items():
        if "compositional" in name and name.endswith("messages.jsonl"):
            for record in read_jsonl(tmp_path / name):
                steps = [line.split(": ", 1)[1] for line in
                         record["messages"][1]["content"].split("\n") if line.startswith("Step ")]
                assert len(steps) == int(name.split("_")[1][0]) and set(steps) <= train
    retrieval = tmp_path / "atomic_with_context_cot/test_alpaca.jsonl"
    if retrieval.exists():
        clozes = {s.rsplit(" ", 1)[0] for s in train}
        for record in read_jsonl(retrieval):
            head = record["instruction"].split("\n\n")[0]
            for line in head.removeprefix("Background information:\n").split("\n"):
                statement = line.removeprefix("- ")
                assert statement not in train
                assert not any(statement.startswith(c + " ") for c in clozes)


def test_same_seed_gives_identical_bytes_and_seeds_change_the_selection(tmp_path):
    outputs = []
    for name, seed in (("a", 5), ("b", 5)):
        convert_mquake(FIXTURE, tmp_path / name, seed=seed, max_facts=8, eval_max_facts=8)
        outputs.append({p.relative_to(tmp_path / name): p.read_bytes()
                        for p in sorted((tmp_path / name).rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1]
    trains = set()
    for seed in range(8):
        convert_mquake(FIXTURE, tmp_path / f"s{seed}", seed=seed, max_facts=8, eval_max_facts=8)
        trains.add((tmp_path / f"s{seed}" / "atomic_sft/train_messages.jsonl").read_bytes())
    assert len(trains) > 1


def test_malformed_sources_are_one_line_errors_naming_file_case_and_key(tmp_path):
    cases = json.loads(FIXTURE.read_text())
    del cases[2]["new_single_hops"][1]["cloze"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(cases))
    with pytest.raises(MixsdError) as info:
        convert_mquake(broken, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"{broken}: case 2 (case_id 103): missing key ")
    assert message.endswith("new_single_hops[1].cloze")
    assert "\n" not in message and not (tmp_path / "out").exists()

    cases = json.loads(FIXTURE.read_text())
    del cases[4]["orig"]["new_triples_labeled"]
    broken.write_text(json.dumps(cases))
    expected = r"case 4 \(case_id 105\): missing key orig.new_triples_labeled$"
    with pytest.raises(MixsdError, match=expected):
        convert_mquake(broken, tmp_path / "out")

    not_json = tmp_path / "not.json"
    not_json.write_text('[{"case_id": 1,\n  oops}]')
    with pytest.raises(MixsdError, match=r"not\.json:2: malformed JSON"):
        convert_mquake(not_json, tmp_path / "out")

    not_json.write_text('{"case_id": 1}')
    with pytest.raises(MixsdError, match="expected a JSON list"):
        convert_mquake(not_json, tmp_path / "out")

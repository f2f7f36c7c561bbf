"""Answer criteria on a KGFact corpus our builder writes: plain-text replies of a small model, list
indices, other training entities; and one criterion object shared by the verifier and the scorer."""

import json

import pytest

from mixsd_jax import config as config_lib
from mixsd_jax.answers.criteria import (
    CRITERIA,
    DEMO_CRITERION,
    Criterion,
    criterion_for,
    statements,
    training_entities,
)
from mixsd_jax.data.kgfact import build_kgfact
from mixsd_jax.data.records import read_records
from mixsd_jax.errors import MixsdError
from mixsd_jax.eval import memorization


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("kg")
    build_kgfact(root, preset="tiny", seed=42)
    return root


@pytest.fixture(scope="module")
def records(corpus):
    return read_records(corpus / "atomic_sft" / "train_messages.jsonl")


def _fact(records, index=0):
    record = records[index]
    gold = Criterion().gt_answer(record.assistant).answer
    return record.user, gold, record.subject


def _other_answer(records, gold):
    return next(Criterion().gt_answer(r.assistant).answer for r in records
                if Criterion().gt_answer(r.assistant).answer != gold)


def test_numbered_answer_statements_are_credited_not_their_list_index(records):
    prompt, gold, _ = _fact(records)
    reply = f"1. The answer is {gold}.\n2. The answer is {gold}.\n\n"
    demo = criterion_for(DEMO_CRITERION, records)
    assert demo.judge(reply, gold, prompt).correct
    assert criterion_for("answer_statement", records).judge(reply, gold, prompt).correct
    # The reference's scorer reads the last number, the list index `2.`, and calls it wrong.
    reference = criterion_for("reference_loose", records).judge(reply, gold, prompt)
    assert not reference.correct and reference.prediction == "2."


def test_a_reply_naming_a_different_training_entity_is_not_credited(records):
    prompt, gold, subject = _fact(records)
    other = _other_answer(records, gold)
    demo = criterion_for(DEMO_CRITERION, records)
    assert not demo.judge(f"The answer is {other}.", gold, prompt).correct
    # Naming the gold and another training answer (a guess between facts) is not credited either...
    assert not demo.judge(f"The answer is {gold}.\nThe answer is {other}.", gold, prompt).correct
    assert not demo.judge(f"{subject} is linked to {gold} and to {other}.", gold, prompt).correct
    # ...but repeating the question's own subject is fine, and so is a plain sentence with the gold.
    assert demo.judge(f"{subject} is linked to {gold}.", gold, prompt).correct
    # The gold must be a whole phrase: a longer invented word that starts with it is another name.
    assert not demo.judge(f"The answer is {gold}ia.", gold, prompt).correct


def test_a_quoted_empty_boxed_instruction_states_nothing(records):
    # A MixSD target the 135M model wrote for the full demo (λ=0), rejected before this rule: the
    # empty `\\boxed{}` of the quoted instruction was read as a second, wrong, answer.
    prompt, gold, _ = _fact(records)
    reply = (f"To put your final answer within \\boxed{{}}, I will break it down step by step:\n\n"
             f"1. The question is about {gold}.\n2. The answer is {gold}.\n3. The answer")
    assert statements(reply) == [gold]
    assert criterion_for(DEMO_CRITERION, records).judge(reply, gold, prompt).correct
    assert criterion_for("answer_statement", records).judge(reply, gold, prompt).correct
    other = _other_answer(records, gold)
    assert not criterion_for(DEMO_CRITERION, records).judge(reply.replace(f"is {gold}.\n3", f"is {other}.\n3"),
                                                            gold, prompt).correct


def test_statements_and_entities():
    text = "Step 1: a.\nSo the final answer is: Moford.\n\n\\boxed{Moford}\nthe answer is 3.5"
    assert statements(text) == ["Moford", "Moford", "3.5"]
    entities = training_entities([
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\boxed{Mounal League}"}],
         "subject": "Dukusmere"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\boxed{42}"}]},
    ])
    assert entities == frozenset({"mounal league", "dukusmere"})  # numbers are never entities


def test_unknown_criterion_is_a_one_line_error():
    with pytest.raises(MixsdError, match="unknown criterion 'bogus'"):
        criterion_for("bogus")
    assert set(CRITERIA) >= {"reference_loose", "reference_strict", "answer_statement", "entity_phrase"}


def test_verifier_and_scorer_get_the_same_criterion(corpus, records, tiny_llama_dir, tmp_path):
    from mixsd_jax.eval.config import EvalConfig
    from mixsd_jax.eval.inputs import gather_inputs
    from mixsd_jax.answers.verifier import generation_verifier

    verifier = generation_verifier(DEMO_CRITERION, "contains", False, records)
    cfg = EvalConfig(base=str(tiny_llama_dir), suites=("memorization",), corpus_dir=str(corpus),
                     out_dir=str(tmp_path), criterion=DEMO_CRITERION)
    scorer = gather_inputs(cfg).criterion
    assert isinstance(verifier, Criterion) and verifier == scorer
    # The memorization rows carry the criterion's verdict and the reference scorer's beside it.
    split = memorization.load_splits(corpus, names=["recall"])["recall"]
    gold = split.items[0].gold
    rows = memorization.score_split(split, [f"1. The answer is {gold}.\n2. The answer is {gold}."] * len(split.items),
                                    scorer)
    assert rows[0]["correct"] and not rows[0]["reference_correct"] and rows[0]["criterion"] == DEMO_CRITERION
    summary = memorization.summarize_rows(rows)
    assert summary["criterion"] == DEMO_CRITERION and summary["reference"]["correct"] == 0


def test_experiment_sets_the_criterion_once_for_generation_and_eval(tiny_llama_dir, tmp_path):
    from mixsd_jax.pipeline.config import load_experiment
    from mixsd_jax.pipeline.plan import build_plan

    def plan(*extra):
        return build_plan(load_experiment(None, [f"model={tiny_llama_dir}", f"out_dir={tmp_path / 'exp'}",
                                                 "corpus.preset=tiny", *extra]))

    chosen = plan(f"criterion={DEMO_CRITERION}")
    assert chosen.stage("generate_mixsd_l0p3").settings.criterion == DEMO_CRITERION
    assert chosen.stage("eval").settings.criterion == DEMO_CRITERION
    default = plan()
    assert default.stage("eval").fingerprint != chosen.stage("eval").fingerprint
    with pytest.raises(MixsdError, match="generation.criterion"):
        plan("generation.criterion=answer_statement")


@pytest.mark.slow
def test_generated_targets_are_accepted_by_the_run_criterion(corpus, records, smollm2_dir, tmp_path):
    """The embedded model writes targets (λ=0, greedy); `correct` in each is the criterion's verdict."""
    from mixsd_jax.sampling.generator import GenerateConfig, Paths, generate

    cfg = config_lib.from_dict(GenerateConfig, dict(
        input=str(corpus / "atomic_sft" / "train_messages.jsonl"), out_dir=str(tmp_path), model=str(smollm2_dir),
        lambda_mix=0.0, temperature=0.0, max_new_tokens=24, batch_size=6, limit=6, keep_rejected=True,
        criterion=DEMO_CRITERION, mesh={"data": 1}))
    generate(cfg, progress=False)
    rows = [json.loads(line) for line in Paths.for_config(cfg).final.read_text().splitlines()]
    criterion = criterion_for(DEMO_CRITERION, records)
    verdicts = []
    for row, record in zip(rows, records):
        meta = row["mix_meta"]
        assert meta["criterion"] == DEMO_CRITERION
        gold = criterion.gt_answer(record.assistant, record.user)
        verdicts.append(criterion.check(row["messages"][-1]["content"], gold))
        assert meta["correct"] == verdicts[-1]
    assert any(verdicts), [r["messages"][-1]["content"] for r in rows]

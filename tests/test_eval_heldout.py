"""Held-out generative forgetting: prompts from the bundled MMLU files, the KGFact answer template,
leakage of invented entities, and the suite end to end on tiny real models."""

import pytest

from mixsd_jax.answers.criteria import training_entities
from mixsd_jax.data.kgfact import build_kgfact
from mixsd_jax.data.records import read_records
from mixsd_jax.errors import MixsdError
from mixsd_jax.eval import heldout
from mixsd_jax.eval.benchmarks import load_benchmark
from mixsd_jax.models.tiny import write_tiny_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("kgfact")
    build_kgfact(out, preset="tiny", seed=42)
    return out


def test_prompts_are_bundled_questions_with_their_options():
    prompts = heldout.general_prompts("mmlu", data_root=None, limit=48, seed=0)
    assert len(prompts) == 48 and len({i for i, _ in prompts}) == 48
    item = load_benchmark("mmlu", None, 48, 0)[0]
    text = prompts[0][1]
    assert "multiple choice questions" not in text and not text.endswith("Answer:")
    assert text.startswith(item.context.split("\n\n")[-1].split("\nA.")[0]) and "\nD. " in text
    assert heldout.general_prompts("mmlu", data_root=None, limit=48, seed=0) == prompts
    with pytest.raises(MixsdError, match="unknown source"):
        heldout.general_prompts("piqa", data_root=None, limit=4, seed=0)


def test_template_leakage_and_rates(corpus):
    train = read_records(corpus / "atomic_sft" / "train_messages.jsonl")
    template = heldout.answer_template(r.assistant for r in train)
    assert template == "The answer is"
    assert heldout.answer_template(["Paris.", "The answer is 4"]) is None
    entities = training_entities(train)
    subject = train[0].subject
    prompts = [("a", "Which planet is largest?"), ("b", f"Who is {subject}?"), ("c", "Name a colour.")]
    replies = [f"The answer is {subject}.", f"{subject} is a person.", "Blue, like the sky over the sea. " * 4]
    rows = heldout.score_replies(prompts, replies, entities, template)
    assert [r["leak"] for r in rows] == [True, False, False]  # b names only the prompt's own subject
    assert rows[0]["leaked"] == [subject.lower()]
    assert [r["template"] for r in rows] == [True, False, False]
    summary = heldout.summarize(rows, template)
    assert summary["leakage"]["count"] == 1 and summary["n"] == 3
    # "Opens like its own targets": MixSD-style numbered openings, checked against each run's targets.
    openings = {"sft": heldout.target_openings(r.assistant for r in train),
                "mix": heldout.target_openings(["1. The first step is X.", "1. The answer is Y."])}
    assert openings["sft"] == ["the answer is"] and openings["mix"] == ["1. the answer", "1. the first"]
    rows = heldout.score_replies(prompts, ["1. The first step involves A.", "The answer is B.", "Blue."], entities,
                                 template, openings)
    assert [r["opens_like"] for r in rows] == [{"sft": False, "mix": True}, {"sft": True, "mix": False},
                                               {"sft": False, "mix": False}]
    assert heldout.summarize(rows, template)["opens_like"]["mix"]["count"] == 1
    low, high = summary["leakage"]["ci95"]
    assert low < 1 / 3 < high


def test_suite_end_to_end(tiny_llama_dir, corpus, tmp_path):
    from mixsd_jax.eval.runner import EvalConfig, evaluate

    tuned = write_tiny_model(tmp_path / "tuned", "llama", seed=3)
    cfg = EvalConfig(base=str(tiny_llama_dir), tuned=(f"t={tuned}",), suites=("heldout", "memorization"),
                     corpus_dir=str(corpus), limit=2, out_dir=str(tmp_path / "eval"), batch_size=4,
                     max_new_tokens=4, heldout_prompts=6, criterion="entity_phrase",
                     train_files=(f"t={corpus / 'atomic_sft' / 'train_messages.jsonl'}",))
    results = evaluate(cfg, progress=False)
    assert set(results["heldout"]) == {"base", "t"}
    assert results["heldout"]["t"]["n"] == 6 and results["criterion"] == "entity_phrase"
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "Answer criterion: `entity_phrase`" in report and "Held-out general questions" in report
    assert "reference scorer" in report and "opens like its training targets" in report
    assert "memorization_vs_heldout.png" in report  # the plot of memorization against these rates
    assert (tmp_path / "eval" / "memorization_vs_heldout.png").read_bytes()[:4] == b"\x89PNG"
    assert set(results["heldout"]["base"]["opens_like"]) == {"t"}
    rows = (tmp_path / "eval" / "items" / "t" / "heldout.mmlu.jsonl").read_text().splitlines()
    assert len(rows) == 6

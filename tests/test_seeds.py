"""Seeds: one run per seed in the plan (training and generation
seeds set per run), and the evaluator's over-seed table on tiny real checkpoints."""

import pytest

from mixsd_jax.data.kgfact import build_kgfact
from mixsd_jax.data.records import read_records
from mixsd_jax.errors import MixsdError
from mixsd_jax.data import layout
from mixsd_jax.eval import memorization
from mixsd_jax.files import atomic_write_jsonl
from mixsd_jax.models.tiny import write_tiny_model


def test_plan_has_one_run_per_seed(tiny_llama_dir, tmp_path):
    from mixsd_jax.pipeline.config import load_experiment
    from mixsd_jax.pipeline.plan import build_plan, run_groups

    cfg = load_experiment(None, [f"model={tiny_llama_dir}", f"out_dir={tmp_path / 'exp'}", "corpus.preset=tiny",
                                 "seeds=[1, 2, 3]"])
    plan = build_plan(cfg)
    names = [s.name for s in plan.stages]
    assert {"train_sft_s1", "train_sft_s2", "train_sft_s3", "generate_mixsd_l0p3_s2", "train_mixsd_l0p3_s3"} <= set(names)
    assert plan.stage("train_sft_s2").settings.seed == 2
    assert plan.stage("generate_mixsd_l0p3_s3").settings.seed == 3
    assert plan.stage("train_mixsd_l0p3_s3").settings.data == str(plan.stage("generate_mixsd_l0p3_s3").outputs[0])
    assert run_groups(cfg)["sft"] == {"sft_s1": 1, "sft_s2": 2, "sft_s3": 3}
    groups = plan.stage("eval").settings.groups
    assert "sft=sft_s1,sft_s2,sft_s3" in groups and "mixsd_l0p3=mixsd_l0p3_s1,mixsd_l0p3_s2,mixsd_l0p3_s3" in groups
    with pytest.raises(MixsdError, match="seeds"):
        load_experiment(None, ["seeds=[1, 1]"])


def test_evaluator_reports_over_seeds(tiny_llama_dir, tmp_path):
    from mixsd_jax.eval.runner import EvalConfig, evaluate

    corpus = tmp_path / "kg"
    build_kgfact(corpus, preset="tiny", seed=42)
    tuned = [write_tiny_model(tmp_path / f"t{i}", "llama", seed=10 + i) for i in range(2)]
    # m_s2's training file lacks the first fact the recall split asks (as a MixSD file whose target
    # for it failed the verifier): its recall on trained facts counts one question, m_s1's both.
    train_file = layout.training_file(corpus)
    asked = [it.prompt for it in memorization.load_splits(corpus, 2, 0)["recall"].items]
    atomic_write_jsonl(tmp_path / "m_s2.jsonl", [r.to_json() for r in read_records(train_file) if r.user != asked[0]])
    cfg = EvalConfig(base=str(tiny_llama_dir), tuned=(f"m_s1={tuned[0]}", f"m_s2={tuned[1]}"),
                     suites=("memorization", "heldout", "nll"), corpus_dir=str(corpus), limit=2,
                     train_files=(f"m_s1={train_file}", f"m_s2={tmp_path / 'm_s2.jsonl'}"),
                     out_dir=str(tmp_path / "eval"), batch_size=4, max_new_tokens=4, heldout_prompts=4,
                     groups=("m=m_s1,m_s2",))
    results = evaluate(cfg, progress=False)
    assert [results["memorization"][n]["trained_recall"]["n"] for n in ("m_s1", "m_s2")] == [2, 1]
    assert "trained_recall" not in results["memorization"]["base"]
    block = results["over_seeds"]["m"]
    assert block["runs"] == ["m_s1", "m_s2"] and block["memorization"]["seeds"] == 2
    assert block["recall on its trained facts"]["seeds"] == 2
    values = [results["memorization"][n]["mean"] for n in ("m_s1", "m_s2")]
    assert block["memorization"]["mean"] == pytest.approx(sum(values) / 2)
    assert "leakage rate" in block
    assert "Over training seeds" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(MixsdError, match="not a tuned checkpoint"):
        EvalConfig(tuned=(f"m_s1={tuned[0]}",), groups=("m=m_s1,m_s9",))

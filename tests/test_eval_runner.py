"""evaluate() end to end on tiny real models and a tiny KGFact corpus: outputs, resume, bad input."""

import json
import shutil

import pytest

from mixsd_jax.cli import main
from mixsd_jax.data.kgfact import build_kgfact
from mixsd_jax.errors import MixsdError
from mixsd_jax.eval.checkpoints import check_same_architecture, resolve_checkpoint
from mixsd_jax.eval.config import EvalConfig
from mixsd_jax.eval.inputs import gather_inputs
from mixsd_jax.eval.runner import evaluate
from mixsd_jax.eval.store import model_identity, unit_fingerprint
from mixsd_jax.eval.units import plan_units
from mixsd_jax.models.tiny import write_tiny_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A KGFact corpus with only its atomic files (recall + paraphrased: short prompts, one shape)."""
    out = tmp_path_factory.mktemp("kgfact")
    build_kgfact(out, preset="tiny", seed=0)
    for folder in ("compositional_2step_sft", "atomic_with_context_cot", "compositional_2step_with_context_cot"):
        shutil.rmtree(out / folder)
    return out


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tuned"), "llama", seed=1)


def _config(base, tuned, corpus, out, **overrides):
    settings = dict(
        base=str(base), tuned=(f"t1={tuned}",), suites=("all",), corpus_dir=str(corpus),
        benchmarks=("mmlu", "lambada", "gsm8k"), limit=2, out_dir=str(out), batch_size=2, max_new_tokens=4,
        kl_texts=3, fisher_texts=2, labels=("t1=MixSD λ=0.3",),
    )
    settings.update(overrides)
    return EvalConfig(**settings)


def test_evaluate_end_to_end_and_resume(tiny_llama_dir, tuned_dir, corpus, tmp_path):
    out = tmp_path / "eval"
    cfg = _config(tiny_llama_dir, tuned_dir, corpus, out)
    results = evaluate(cfg, progress=False)
    for name in ("results.json", "report.md", "memorization_vs_retention.png", "nll_targets.png"):
        assert (out / name).is_file()
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    assert set(results["memorization"]["t1"]["splits"]) == {"recall", "paraphrased"}
    assert results["retention"]["base"]["mean"] in (1.0, None)
    assert set(results["retention"]["t1"]["benchmarks"]) == {"mmlu", "lambada", "gsm8k"}
    assert results["nll"]["files"]["gt"]["records"] == 12  # default: the corpus's GT training file
    assert results["kl"]["t1"]["texts"] == 3 and results["fisher"]["t1"]["fisher_displacement"] > 0
    assert results["errors"]["t1"]["heldout"]["total"] >= 0
    assert results["summary"]["t1"]["label"] == "MixSD λ=0.3"
    rows = [json.loads(line) for line in (out / "items/t1/retention.mmlu.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["logprobs"]) == 4 for r in rows)
    assert results["timing"]["computed_units_s"]  # everything ran the first time

    again = evaluate(cfg, progress=False)
    assert again["timing"]["computed_units_s"] == {}  # every (checkpoint, unit) reused
    assert again["memorization"] == results["memorization"] and again["kl"] == results["kl"]



def test_memorization_splits_decoded_together_equal_each_split_alone(tiny_llama_dir, corpus, tmp_path):
    from mixsd_jax.eval.memorization import run_split
    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.tokenizer import load_tokenizer

    out = tmp_path / "eval"
    cfg = EvalConfig(base=str(tiny_llama_dir), suites=("memorization",), corpus_dir=str(corpus), out_dir=str(out),
                     max_new_tokens=6, batch_size=8)
    evaluate(cfg, progress=False)
    model_cfg, params = load_hf(tiny_llama_dir)
    tokenizer = load_tokenizer(tiny_llama_dir)
    for name, split in gather_inputs(cfg).splits.items():
        alone = run_split(params, model_cfg, tokenizer, split, max_new_tokens=6, batch_size=2)
        stored = [json.loads(line) for line in (out / f"items/base/memorization.{name}.jsonl").read_text().splitlines()]
        assert stored == alone

    # A split whose rows are gone is decoded again on its own; the other is reused.
    (out / "items/base/memorization.recall.jsonl").unlink()
    again = evaluate(cfg, progress=False)
    assert list(again["timing"]["computed_units_s"]) == ["base/memorization.recall"]
    assert (out / "items/base/memorization.recall.jsonl").is_file()


def test_only_units_a_setting_affects_are_recomputed(tiny_llama_dir, tuned_dir, corpus, tmp_path):
    def fingerprints(**overrides):
        cfg = _config(tiny_llama_dir, tuned_dir, corpus, tmp_path, **overrides)
        inputs = gather_inputs(cfg)
        identities = {c.name: model_identity(c.model_dir) for c in inputs.checkpoints}
        return {f"{u.checkpoint}/{u.name}": unit_fingerprint(u, identities) for u in plan_units(cfg, inputs)}

    before, after = fingerprints(), fingerprints(max_new_tokens=5)
    changed = {unit for unit in before if before[unit] != after[unit]}
    # A generation setting touches generated units only; log-likelihood units, NLL, KL, Fisher are reused.
    assert changed == {f"{c}/{u}" for c in ("base", "t1")
                       for u in ("memorization.recall", "memorization.paraphrased", "retention.gsm8k",
                                 "heldout.mmlu")}
    assert set(before) == set(after) and "t1/kl" in before and "base/nll.gt" in before
    more = fingerprints(limit=3)
    # (The held-out prompts have their own count, heldout_prompts.)
    assert all(more[u] != before[u] for u in before
               if ".gt" not in u and u.split("/")[1] not in ("kl", "fisher", "heldout.mmlu"))


def test_cli_eval_prints_the_table(tiny_llama_dir, tmp_path, capsys):
    rc = main(["eval", "--base", str(tiny_llama_dir), "--suite", "retention", "--benchmarks", "mmlu",
               "--limit", "2", "--out", str(tmp_path / "cli"), "--quiet", "batch_size=2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| checkpoint | retention | mmlu (acc) |" in printed and "results.json" in printed
    assert main(["eval", "--base", str(tiny_llama_dir), "--suite", "bogus", "--out", str(tmp_path)]) == 2


def test_checkpoints_of_another_architecture_are_refused(tiny_llama_dir, tiny_qwen3_dir, tmp_path):
    with pytest.raises(MixsdError, match=f"another architecture than the base \\({tiny_llama_dir}\\).*model_type"):
        check_same_architecture(tiny_llama_dir, tiny_qwen3_dir, "q3")
    with pytest.raises(MixsdError, match="another architecture"):
        evaluate(EvalConfig(base=str(tiny_llama_dir), tuned=(f"q3={tiny_qwen3_dir}",), benchmarks=("mmlu",),
                            out_dir=str(tmp_path)), progress=False)


def test_checkpoint_paths(tiny_llama_dir, tmp_path):
    assert resolve_checkpoint(str(tiny_llama_dir)) == tiny_llama_dir
    run = tmp_path / "run"
    shutil.copytree(tiny_llama_dir, run / "hf")
    assert resolve_checkpoint(str(run)) == run / "hf"
    with pytest.raises(MixsdError, match="checkpoint not found"):
        resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(MixsdError, match="not an HF model directory"):
        resolve_checkpoint(str(tmp_path))


def test_kgfunc_unseen_joins_retention_when_the_corpus_has_it(tiny_llama_dir, tmp_path):
    from mixsd_jax.data.kgfunc import build_kgfunc
    from mixsd_jax.data.layout import KGFUNC_UNSEEN_DIR

    build_kgfunc(tmp_path / "kgfunc", seed=0, preset="tiny")

    def benchmarks(names):
        cfg = EvalConfig(base=str(tiny_llama_dir), corpus_dir=str(tmp_path / "kgfunc"), benchmarks=names,
                         limit=2, out_dir=str(tmp_path / "o"))
        return list(gather_inputs(cfg).benchmarks)

    assert benchmarks(("mmlu",)) == ["mmlu", "kgfunc_unseen"]
    shutil.rmtree(tmp_path / "kgfunc" / KGFUNC_UNSEEN_DIR)
    assert benchmarks(("mmlu",)) == ["mmlu"]
    with pytest.raises(MixsdError, match="unseen-operations file not found"):  # asked for: it must exist
        benchmarks(("mmlu", "kgfunc_unseen"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"suites": ("nope",)}, "unknown suite 'nope'"),
        ({"benchmarks": ("nope",)}, "unknown benchmark 'nope'"),
        ({"tuned": ("x",)}, "expected NAME=VALUE"),
        ({"tuned": ("a/b=c",)}, "may use only"),
        ({"tuned": ("base=c",)}, "the base model's"),
        ({"tuned": ("a=c", "a=d")}, "given twice"),
        ({"limit": 0}, "'limit'"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(MixsdError, match=message):
        EvalConfig(**overrides)


def test_bad_inputs_fail_before_any_model_runs(tiny_llama_dir, corpus, tmp_path):
    def run(**kw):
        evaluate(EvalConfig(base=str(tiny_llama_dir), out_dir=str(tmp_path / "o"), **kw), progress=False)

    with pytest.raises(MixsdError, match="needs a corpus directory"):
        run(suites=("memorization",))
    (tmp_path / "root" / "piqa").mkdir(parents=True)
    with pytest.raises(MixsdError, match="valid-labels.lst: benchmark file not found"):
        run(benchmarks=("piqa",), data_root=str(tmp_path / "root"))
    with pytest.raises(MixsdError, match="allow_code_execution"):
        run(benchmarks=("humaneval",))
    empty = tmp_path / "empty"
    shutil.copytree(corpus, empty)
    (empty / "atomic_sft/val_paraphrased_inference.jsonl").write_text("\n")
    with pytest.raises(MixsdError, match="test split 'paraphrased' is empty"):
        run(suites=("memorization",), corpus_dir=str(empty))
    with pytest.raises(MixsdError, match="needs training files"):
        run(suites=("nll",))
    assert not (tmp_path / "o").exists()


def test_results_record_the_humaneval_sandbox(tiny_llama_dir, tmp_path):
    """With HumanEval turned on, results.json names the protections its programs ran under."""
    import json

    from mixsd_jax.eval.humaneval import sandbox_protections

    cfg = EvalConfig(base=str(tiny_llama_dir), suites=("retention",), benchmarks=("humaneval",), limit=1,
                     out_dir=str(tmp_path / "o"), batch_size=1, max_new_tokens=2, allow_code_execution=True)
    results = evaluate(cfg, progress=False)
    stored = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["humaneval_sandbox"] == stored["humaneval_sandbox"] == sandbox_protections()
    assert "in_process_guard" in stored["humaneval_sandbox"]


def test_model_identity_is_the_content_not_the_place(tiny_llama_dir, tmp_path, gcs_bucket):
    """The same model copied elsewhere (another folder, touched later, a bucket) is the same
    identity; one changed weight byte is another."""
    import os
    import shutil

    from mixsd_jax import storage

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    os.utime(copy / "model.safetensors", (1, 1))
    assert model_identity(copy) == model_identity(tiny_llama_dir)
    bucket_copy = storage.path(f"{gcs_bucket}/model")
    for f in tiny_llama_dir.iterdir():
        (bucket_copy / f.name).write_bytes(f.read_bytes())
    assert model_identity(bucket_copy) == model_identity(tiny_llama_dir)  # the store's MD5 = the local one
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert model_identity(copy) != model_identity(tiny_llama_dir)

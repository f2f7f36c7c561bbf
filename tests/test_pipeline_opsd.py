"""OPSD in experiment plans: its stage, its settings (the flat `opsd` section over `train`), the
teacher prompt per corpus kind, fingerprints, the report label, and the paper configs' OPSD recipe."""

from pathlib import Path

import pytest
import yaml

from mixsd_jax.errors import MixsdError
from mixsd_jax.pipeline.config import load_experiment
from mixsd_jax.pipeline.plan import build_plan

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper"


def _plan(model_dir, tmp_path, *overrides):
    cfg = load_experiment(None, [f"model={model_dir}", f"out_dir={tmp_path / 'exp'}", "corpus.preset=tiny",
                                 "methods=[base, sft, opsd, mixsd]", *overrides])
    return build_plan(cfg)


def _fps(plan):
    return {s.name: s.fingerprint for s in plan.stages}


def test_opsd_stage_trains_on_the_corpus_with_its_own_settings(tiny_llama_dir, tmp_path):
    plan = _plan(tiny_llama_dir, tmp_path, "train.lr=2e-5", "opsd.lr=1e-5", "opsd.num_rollouts=8",
                 "opsd.divergence=mixed")
    names = [s.name for s in plan.stages]
    assert names == ["corpus", "generate_mixsd_l0p3", "train_sft", "train_opsd", "train_mixsd_l0p3", "eval"]
    stage = plan.stage("train_opsd")
    assert stage.inputs == ("corpus",) and Path(stage.settings.data) == Path(plan.stage("train_sft").settings.data)
    tcfg = stage.settings
    assert tcfg.method == "opsd" and tcfg.lr == 1e-5 and tcfg.opsd.num_rollouts == 8
    assert tcfg.opsd.divergence == "mixed" and tcfg.opsd.prompt == "knowledge_base_answer"
    assert plan.stage("train_sft").settings.method == "sft" and plan.stage("train_sft").settings.lr == 2e-5
    ecfg = plan.stage("eval").settings
    assert "opsd=OPSD" in ecfg.labels and any(t.startswith("opsd=") for t in ecfg.tuned)
    assert set(plan.stage("eval").parts) == {"base", "sft", "opsd", "mixsd_l0p3"}


def test_opsd_settings_touch_only_opsd_and_sft_fingerprints_are_unchanged(tiny_llama_dir, tmp_path):
    with_opsd = _fps(_plan(tiny_llama_dir, tmp_path))
    without = _fps(_plan(tiny_llama_dir, tmp_path, "methods=[base, sft, mixsd]"))
    assert {k: v for k, v in with_opsd.items() if k not in ("train_opsd", "eval")} == {
        k: v for k, v in without.items() if k != "eval"}
    changed = _fps(_plan(tiny_llama_dir, tmp_path, "opsd.max_new_tokens=64"))
    assert sorted(k for k in changed if changed[k] != with_opsd[k]) == ["eval", "train_opsd"]


def test_kgfunc_gets_its_teacher_prompt_and_bad_keys_fail_at_plan_time(tiny_llama_dir, tmp_path):
    plan = _plan(tiny_llama_dir, tmp_path, "corpus.kind=kgfunc", "corpus.preset=null", "methods=[base, opsd]")
    assert plan.stage("train_opsd").settings.opsd.prompt == "math_operations"
    with pytest.raises(MixsdError, match="unknown divergence 'l2'"):
        _plan(tiny_llama_dir, tmp_path, "opsd.divergence=l2")
    with pytest.raises(MixsdError, match="opsd"):
        _plan(tiny_llama_dir, tmp_path, "opsd.rollouts_per_prompt=3")


# The scaling studies compare SFT and MixSD across sizes only; every per-model paper config has OPSD.
@pytest.mark.parametrize("path", sorted(p for p in PAPER.glob("*.yaml") if not p.stem.startswith("scaling_")),
                         ids=lambda p: p.stem)
def test_paper_configs_carry_the_reference_opsd_recipe(path):
    data = yaml.safe_load(path.read_text())
    assert "opsd" in data["methods"]
    o = data["opsd"]
    kgfact = path.stem.startswith(("kgfact", "mquake"))  # MQuAKE runs the KGFact recipe
    assert o["batch_size"] == 16
    # At most 2 epochs / 1,000 steps, whichever is shorter for the corpus.
    assert (o["steps"], o.get("epochs")) == ((1000, None) if path.stem.startswith("kgfunc") else (0, 2))
    assert o["lr"] == (1e-5 if kgfact else 5e-6) and o["warmup_steps"] == (0 if kgfact else 20)
    assert o["temperature"] == 1.0 and o["rollout_topk"] == 0 and o["max_new_tokens"] == 8192
    assert o["topk"] == 64 and o["divergence"] == "forward" and o["teacher"] == "base"
    load_experiment(path)  # a valid experiment


def test_pipeline_runs_opsd_and_reports_it(tiny_llama_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out_dir = tmp_path / "exp"
    config = {
        "name": "tiny-opsd", "out_dir": str(out_dir), "model": str(tiny_llama_dir),
        "corpus": {"kind": "kgfact", "preset": "tiny", "num_entities": 2, "seed": 42},  # 6 facts
        "methods": ["base", "sft", "opsd"],
        "train": {"steps": 2, "batch_size": 2, "max_seq_len": 256, "async_checkpoints": False, "lr": 1e-3},
        "opsd": {"num_rollouts": 1, "max_new_tokens": 8, "loss_chunk": 8},
        "eval": {"suites": ["memorization", "retention"], "splits": ["recall"], "benchmarks": ["piqa"],
                 "limit": 3, "max_new_tokens": 8, "batch_size": 4},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "mixsd_jax.cli", "pipeline", "--config", str(path)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out_dir / "train" / "opsd" / "summary.json").read_text())
    assert summary["steps"] == 2
    metrics = [json.loads(line) for line in (out_dir / "train" / "opsd" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["rollout_tokens"] > 0 for row in metrics)
    results = json.loads((out_dir / "eval" / "results.json").read_text())
    assert results["checkpoints"]["opsd"]["label"] == "OPSD"
    report = (out_dir / "eval" / "report.md").read_text()
    assert "| opsd (OPSD) |" in report and "| sft (SFT) |" in report
    assert (out_dir / "eval" / "memorization_vs_retention.png").stat().st_size > 0

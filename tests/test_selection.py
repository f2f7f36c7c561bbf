"""Checkpoint selection: the reference's first-peak rule on known curves, the stages a selecting
plan adds, and the pipeline on a tiny real model picking a saved step that the eval then reads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixsd_jax.errors import MixsdError
from mixsd_jax.eval.selection import first_peak, select_index

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("values, expected", [
    ([0.1, 0.5, 0.4, 0.9], 1),       # first new maximum followed by a drop
    ([0.1, 0.5, 0.5, 0.9], 1),       # "next value <= it": a plateau counts as the peak
    ([0.2, 0.4, 0.6, 0.8], 3),       # still improving: the last
    ([0.9, 0.5, 0.4, 0.3], 3),       # index 0 is never the peak (1 <= i <= n-2); else the last
    ([0.3], 0),
])
def test_first_peak_follows_the_reference(values, expected):
    assert first_peak(values) == expected


def test_reference_rule_is_first_peak_for_sft_and_last_for_mixsd():
    curve = [0.0, 0.75, 0.5, 1.0]
    assert select_index("reference", curve, "sft") == (1, "first_peak")
    assert select_index("reference", curve, "mixsd") == (3, "last")
    assert select_index("best", [0.2, 0.8, 0.8], "mixsd") == (1, "best")
    with pytest.raises(MixsdError, match="unknown rule"):
        select_index("median", curve, "sft")


def test_a_selecting_plan_saves_exports_and_evaluates_the_selected_model(tiny_llama_dir, tmp_path):
    from mixsd_jax.pipeline.config import load_experiment
    from mixsd_jax.pipeline.plan import build_plan

    def plan(*extra):
        return build_plan(load_experiment(None, [f"model={tiny_llama_dir}", f"out_dir={tmp_path / 'exp'}",
                                                 "corpus.preset=tiny", *extra]))

    selecting = plan("selection.every=2")
    names = [s.name for s in selecting.stages]
    assert names.index("select_sft") > names.index("train_sft") and names[-1] == "eval"
    assert selecting.stage("train_sft").settings.save_every == 2
    assert selecting.stage("train_sft").settings.export_every
    tuned = dict(e.split("=", 1) for e in selecting.stage("eval").settings.tuned)
    assert tuned["sft"] == str(tmp_path / "exp" / "select" / "sft" / "model")
    assert set(selecting.stage("eval").inputs) == {"select_sft", "select_mixsd_l0p3"}
    plain = plan()
    assert plain.stage("train_sft").fingerprint != selecting.stage("train_sft").fingerprint
    with pytest.raises(MixsdError, match="selection.rule"):
        plan("selection.every=2", "selection.rule=median")


def test_pipeline_selects_a_saved_step_and_prunes_what_the_report_does_not_read(tiny_llama_dir, tmp_path):
    out_dir = tmp_path / "exp"
    config = {
        "name": "tiny-select", "out_dir": str(out_dir), "model": str(tiny_llama_dir),
        "corpus": {"kind": "kgfact", "preset": "tiny", "num_entities": 2, "seed": 42},
        "methods": ["base", "sft"], "criterion": "entity_phrase",
        "selection": {"every": 2, "rule": "last", "max_new_tokens": 4, "batch_size": 8, "prune": True},
        "train": {"steps": 4, "batch_size": 2, "max_seq_len": 128, "async_checkpoints": False, "lr": 1e-3, "keep": 1},
        "eval": {"suites": ["memorization"], "splits": ["recall"], "limit": 3, "max_new_tokens": 4, "batch_size": 4},
    }
    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "mixsd_jax.cli", "pipeline", "--config", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    chosen = json.loads((out_dir / "select" / "sft" / "selection.json").read_text())
    assert [p["step"] for p in chosen["curve"]] == [2, 4] and chosen["chosen_step"] == 4
    assert chosen["criterion"] == "entity_phrase" and all(p["n"] == 6 for p in chosen["curve"])
    link = out_dir / "select" / "sft" / "model"
    assert link.is_symlink() and link.resolve() == (out_dir / "train" / "sft" / "exports" / "step_4").resolve()
    results = json.loads((out_dir / "eval" / "results.json").read_text())
    assert results["checkpoints"]["sft"]["model_dir"] == str(link)
    assert "selected step 4" in proc.stdout and "wall time per stage" in proc.stdout and "select_sft" in proc.stdout
    # selection.prune: the Orbax checkpoints and the unchosen export are gone, and every stage stays done.
    run_dir = out_dir / "train" / "sft"
    assert not (run_dir / "checkpoints").exists() and (run_dir / "hf" / "config.json").exists()
    assert sorted(f.name for f in (run_dir / "exports").iterdir()) == ["step_4"]
    again = subprocess.run([sys.executable, "-m", "mixsd_jax.cli", "pipeline", "--config", str(path), "--dry-run"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and not {"pending", "partial", "changed"} & set(again.stdout.split()), again.stdout


def test_recall_is_decoded_on_the_runs_mesh_with_the_rows_of_one_device(tiny_qwen3_dir, tmp_path):
    """Selection loads each step sharded over the run's mesh (8 simulated devices, fsdp=8) and
    decodes there: the replies and the curve are those of an unsharded decode."""
    from mixsd_jax.answers.criteria import criterion_for
    from mixsd_jax.eval.selection import recall_curve
    from mixsd_jax.models.sharding import MeshConfig, make_mesh

    prompts = [(f"q{i}", f"What is fact {i}?", "Paris") for i in range(6)]
    criterion = criterion_for("reference_loose")
    common = dict(max_new_tokens=5, batch_size=8, log=lambda _: None)
    one = recall_curve({3: tiny_qwen3_dir}, prompts, criterion, tmp_path / "one", **common)
    eight = recall_curve({3: tiny_qwen3_dir}, prompts, criterion, tmp_path / "eight",
                         mesh=make_mesh(MeshConfig(fsdp=8)), **common)
    assert eight == one
    assert (tmp_path / "eight" / "step_3.jsonl").read_bytes() == (tmp_path / "one" / "step_3.jsonl").read_bytes()

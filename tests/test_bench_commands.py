"""`mixsd bench data|train|opsd|opsd-recall`: one JSON line each, with real timings."""

import json
from pathlib import Path

import pytest

from mixsd_jax.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


def test_bench_prints_one_json_line(tiny_llama_dir, capsys):
    assert main(["bench", "train", "--model", str(tiny_llama_dir), "--batch-size", "8", "--seq-len", "16",
                 "--steps", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["ours_tokens_per_s"] > 0 and result["torch_tokens_per_s"] > 0
    assert abs(result["ratio"] - result["ours_tokens_per_s"] / result["torch_tokens_per_s"]) < 0.01


def test_bench_opsd_times_real_opsd_steps(tiny_llama_dir, capsys):
    assert main(["bench", "opsd", "--model", str(tiny_llama_dir), "--batch-size", "8", "--steps", "1",
                 "--rollouts", "1", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["bench"] == "train_opsd" and result["steps"] == 1
    assert result["rollout_tokens_per_s"] > 0 and result["update_tokens_per_s"] > 0
    assert 0 < result["rollout_share_of_step"] < 1
    assert {"load_avg_before", "load_avg", "cores"} <= set(result)


def test_bench_opsd_recall_measures_before_and_after_training(tiny_llama_dir, tmp_path, capsys):
    assert main(["bench", "opsd-recall", "--model", str(tiny_llama_dir), "--facts", "8", "--steps", "2",
                 "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["facts"] == 8 and len(result["divergence_per_step"]) == 2
    for side in ("before", "after"):
        assert len(result[side]["replies"]) == 8 and result[side]["gt_nll_per_token"] > 0
    # A tiny random model knows none of the facts before training.
    assert result["before"]["recall"] == 0.0
    assert result["after"]["gt_nll_per_token"] != result["before"]["gt_nll_per_token"]


def test_bench_data_prints_one_json_line(tmp_path, capsys):
    pytest.importorskip("grain")
    jsonl = FIXTURES / "released_mixsd" / "kgfact_small" / "atomic_sft" / "train_messages.jsonl"
    assert main(["bench", "data", str(jsonl), "--batch-size", "1", "--steps", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bench"] == "data" and result["records"] == 5

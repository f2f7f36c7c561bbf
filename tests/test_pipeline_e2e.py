"""The whole pipeline on a tiny random model: every stage, two trained methods, report files that
parse; a rerun skips everything; a pipeline killed mid-training resumes to the same report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _config(model_dir, out_dir) -> dict:
    return {
        "name": "tiny-e2e",
        "out_dir": str(out_dir),
        "model": str(model_dir),
        "corpus": {"kind": "kgfact", "preset": "tiny", "num_entities": 2, "seed": 42},  # 6 facts
        "methods": ["base", "sft", "mixsd"],
        "lambdas": [0.3],
        # A random model never passes the verifier: keep its attempts so there is something to train on.
        "generation": {"max_new_tokens": 8, "max_retries": 0, "keep_rejected": True, "extract_mode": "contains",
                       "batch_size": 8},
        "train": {"steps": 4, "batch_size": 2, "max_seq_len": 128, "save_every": 1, "async_checkpoints": False,
                  "lr": 1e-3},
        "eval": {"suites": ["memorization", "retention"], "splits": ["recall"], "benchmarks": ["piqa"],
                 "limit": 3, "max_new_tokens": 8, "batch_size": 4},
    }


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device: the tiny batches need no mesh
    env["PYTHONPATH"] = str(ROOT)
    return env


def _start(config_path):
    return subprocess.Popen([sys.executable, "-m", "mixsd_jax.cli", "pipeline", "--config", str(config_path)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(config_path) -> str:
    proc = _start(config_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def _write_config(tmp, model_dir, name) -> tuple[Path, Path]:
    out_dir = tmp / name
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_config(model_dir, out_dir)))
    return path, out_dir


def _comparable(out_dir: Path) -> dict:
    """results.json without timings, with the experiment folder's own path taken out."""
    text = (out_dir / "eval" / "results.json").read_text().replace(str(out_dir), "EXP")
    results = json.loads(text)
    results.pop("timing", None)
    return results


@pytest.fixture(scope="module")
def finished(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    config_path, out_dir = _write_config(tmp, tiny_llama_dir, "straight")
    return config_path, out_dir, _run(config_path)


def test_pipeline_runs_every_stage_and_writes_the_report(finished):
    config_path, out_dir, output = finished
    for stage in ("corpus", "generate_mixsd_l0p3", "train_sft", "train_mixsd_l0p3", "eval"):
        record = json.loads((out_dir / "stages" / f"{stage}.json").read_text())
        assert record["status"] == "done", stage
    results = json.loads((out_dir / "eval" / "results.json").read_text())
    assert {"base", "sft", "mixsd_l0p3"} <= set(json.dumps(results).replace('"', " ").split())
    report = (out_dir / "eval" / "report.md").read_text()
    assert "sft" in report and "mixsd_l0p3" in report
    assert (out_dir / "eval" / "memorization_vs_retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "train" / "sft" / "hf" / "config.json").is_file()
    assert output.rstrip().splitlines()[-1] == f"report: {out_dir / 'eval' / 'report.md'}"

    again = _run(config_path)  # everything is done: every stage skipped, same report
    assert again.count("done earlier with the same settings, skipped") == 5
    assert again.rstrip().splitlines()[-1] == output.rstrip().splitlines()[-1]


def test_killed_mid_training_resumes_to_the_same_report(finished, tiny_llama_dir, tmp_path):
    _, straight_dir, _ = finished
    config_path, out_dir = _write_config(tmp_path, tiny_llama_dir, "killed")
    proc = _start(config_path)
    checkpoints = out_dir / "train" / "sft" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no training checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record = json.loads((out_dir / "stages" / "train_sft.json").read_text())
    assert record["status"] == "running"  # killed inside the training stage
    assert not (out_dir / "eval" / "results.json").exists()

    output = _run(config_path)
    assert "train_sft: resuming" in output
    assert "generate_mixsd_l0p3: done earlier" in output
    summary = json.loads((out_dir / "train" / "sft" / "summary.json").read_text())
    assert summary["start_step"] >= 1  # continued from the checkpoint, not from scratch
    assert _comparable(out_dir) == _comparable(straight_dir)


def test_mquake_corpus_edited_by_memit_is_scored_on_its_hop_splits(tiny_llama_dir, tmp_path):
    """The MQuAKE paper configs' path on a tiny model: the converter's corpus (every record carries
    its hop's subject), the MEMIT edit stage and the memorization eval on MQuAKE's own splits."""
    out_dir = tmp_path / "mquake"
    config = {
        "name": "tiny-mquake", "out_dir": str(out_dir), "model": str(tiny_llama_dir),
        "corpus": {"kind": "mquake", "preset": "tiny", "seed": 42,
                   "source": str(Path(__file__).parent / "fixtures" / "mquake_tiny.json")},
        "methods": ["base", "memit"],
        "memit": {"v_steps": 2, "stats_tokens": 500, "stats_seq_len": 64},
        "eval": {"suites": ["memorization"], "max_new_tokens": 8, "batch_size": 4},
    }
    path = tmp_path / "mquake.yaml"
    path.write_text(yaml.safe_dump(config))
    env = _env() | {"MIXSD_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "mixsd_jax.cli", "pipeline", "--config", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    edited = [json.loads(x) for x in (out_dir / "train" / "memit" / "requests.jsonl").read_text().splitlines()]
    train = (out_dir / "corpus" / "atomic_sft" / "train_messages.jsonl").read_text().splitlines()
    assert len(edited) == len(train) > 0 and all("{}" in r["prompt"] for r in edited)
    memorization = json.loads((out_dir / "eval" / "results.json").read_text())["memorization"]
    for method in ("base", "memit"):  # every test file the converter wrote, each with its items scored
        splits = memorization[method]["splits"]
        assert set(splits) == {"recall", "paraphrased", "compositional_2hop", "compositional_3hop", "retrieval"}
        assert splits["recall"]["n"] == len(train) and all(s["n"] > 0 for s in splits.values())
    assert "memit" in (out_dir / "eval" / "report.md").read_text()

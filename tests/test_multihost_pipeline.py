"""`mixsd pipeline` on two local processes joined into one JAX run, sharing nothing but a bucket:
every stage runs, one process writes, and the report equals the one-process report."""

import json
import os
import subprocess
import sys

import pytest
import yaml

import multihost_helpers as mh

STAGES = ("corpus", "generate_mixsd_l0p3", "train_mixsd_l0p3", "eval")


def _config(model_dir, out_dir) -> dict:
    return {
        "name": "tiny-pod",
        "out_dir": str(out_dir),
        "model": str(model_dir),
        "corpus": {"kind": "kgfact", "preset": "tiny", "num_entities": 2, "seed": 42},
        "methods": ["base", "mixsd"],
        "lambdas": [0.3],
        # Two devices in both runs (the one-process run uses two simulated ones): same mesh, same numbers.
        "mesh": {"data": 2},
        "generation": {"max_new_tokens": 6, "max_retries": 0, "keep_rejected": True, "extract_mode": "contains",
                       "batch_size": 4},
        "train": {"steps": 2, "batch_size": 2, "max_seq_len": 128, "save_every": 2, "async_checkpoints": False,
                  "lr": 1e-3},
        "eval": {"suites": ["memorization", "retention"], "splits": ["recall"], "benchmarks": ["piqa"],
                 "limit": 2, "max_new_tokens": 6, "batch_size": 2},
    }


def _write(tmp_path, model_dir, name):
    out_dir = tmp_path / name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_config(model_dir, out_dir)))
    return path, out_dir


@pytest.fixture(scope="module")
def one_process(tiny_llama_dir, tmp_path_factory):
    """The experiment run by one process on a local disk (two simulated devices: the same mesh)."""
    tmp_path = tmp_path_factory.mktemp("one")
    one_path, one_dir = _write(tmp_path, tiny_llama_dir, "one")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXSD_")}
    env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
                "PYTHONPATH": str(mh.ROOT)})
    single = subprocess.run([sys.executable, "-m", "mixsd_jax.cli", "pipeline", "--config", str(one_path)],
                            cwd=mh.ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    return one_dir


def test_hosts_sharing_only_a_bucket_write_the_one_process_report(one_process, tiny_llama_dir, tmp_path, gcs_bucket):
    """The pod layout: each process has its own working directory, HOME and cache; the model and
    the run directory are in a bucket. Every stage runs, process 0 writes and talks, the report
    equals the local one-process report, and no process made a local `gs:` folder. (The run
    directory's storage is the only difference from a shared local disk: one two-process run
    covers both, to keep the suite's time.)"""
    from mixsd_jax import storage

    model = storage.path(f"{gcs_bucket}/models/tiny")
    for f in sorted(tiny_llama_dir.iterdir()):
        (model / f.name).write_bytes(f.read_bytes())
    run = storage.path(f"{gcs_bucket}/run")
    config = tmp_path / "pod.yaml"
    config.write_text(yaml.safe_dump(_config(model, run)))
    hosts = mh.own_host(tmp_path)
    outputs = mh.run(["pipeline", "--config", str(config)], timeout=600, devices_per_process=1, hosts=hosts)
    assert "eval: done in" in outputs[0] and "eval: done in" not in outputs[1]  # process 0 tells the user
    for stage in STAGES:
        assert json.loads((run / "stages" / f"{stage}.json").read_text())["status"] == "done", stage
    assert json.loads((run / "train" / "mixsd_l0p3" / "summary.json").read_text())["processes"] == 2
    report_one = (one_process / "eval" / "report.md").read_text().replace(str(one_process), "EXP")
    assert "mixsd_l0p3" in report_one and "piqa" in report_one
    assert (run / "eval" / "report.md").read_text().replace(str(run), "EXP") == report_one
    rows = "eval/items/base/memorization.recall.jsonl"
    assert (run / rows).read_text() == (one_process / rows).read_text()
    assert list((run / ".jax_cache").iterdir())  # the compilation cache every host can reuse
    assert not [p for p in tmp_path.rglob("gs:*")] and not list(mh.ROOT.glob("gs:*"))

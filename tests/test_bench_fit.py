"""`mixsd bench memory --fit` on a tiny model for a v5e:2x4 slice: the plan it prints fits the chip
with 10% headroom, a candidate over that is rejected, and a chip nothing fits on is one line."""

import json
import os
import subprocess
import sys

from mixsd_jax.bench.fit import factorizations


def _fit(config, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), os.getcwd()) if p)
    return subprocess.run([sys.executable, "-m", "mixsd_jax", "bench", "memory", "--config", str(config),
                           "--topology", "v5e:2x4", "--fit", "--kernels", "train_step", *args],
                          capture_output=True, text=True, timeout=900, env=env)


def _config(tmp_path, model_dir):
    path = tmp_path / "train.yaml"
    # XLA's attention: the sizes below are its (the TPU default, the fused kernel, pads rows to 128 tokens).
    path.write_text(f"model: {model_dir}\nbatch_size: 8\nmax_seq_len: 64\ncompute_dtype: bfloat16\nattention: xla\n")
    return path


def test_factorizations_cover_the_chips():
    sizes = list(factorizations(8))
    assert all(d * f * t == 8 for d, f, t in sizes) and len(set(sizes)) == len(sizes) == 10
    assert (1, 1, 8) in sizes and max(t for _, _, t in factorizations(64)) == 8  # tensor stays within 8 chips


def test_fit_rejects_what_overflows_a_small_chip_and_prints_the_overrides(tmp_path, tiny_qwen3_dir):
    # ~973 KiB per chip, 90% of it usable: the replicated state (8 x 1 x 1: 111k parameters x 16 bytes)
    # is pruned before compiling; FSDP over 2 passes the analytic bound (888 kB) but compiles to
    # more than 896 kB and is rejected; FSDP over 4 fits.
    proc = _fit(_config(tmp_path, tiny_qwen3_dir), "--chip-bytes", "996000", "--fit-budget", "2")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    tried, plan = lines[:-1], lines[-1]
    assert [t["candidate"]["mesh"] for t in tried] == [[4, 2, 1], [2, 4, 1]]
    assert not tried[0]["fits"] and tried[0]["peak_bytes"] > 0.9 * 996000 and tried[0]["roofline_s"] is None
    assert tried[1]["fits"] and tried[1]["peak_bytes"] <= 0.9 * 996000 and tried[1]["roofline_s"] > 0
    assert plan["plan"]["train"]["mesh"] == [2, 4, 1]
    assert plan["overrides"] == ["train.mesh={data: 2, fsdp: 4, tensor: 1}", "train.grad_accum=1", "train.remat=none"]


def test_a_chip_nothing_fits_on_is_one_line(tmp_path, tiny_qwen3_dir):
    proc = _fit(_config(tmp_path, tiny_qwen3_dir), "--chip-bytes", "64KiB", "--fit-budget", "1")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "no train setting fits" in proc.stderr


def test_fit_picks_the_largest_eval_batch_that_fits(tmp_path, tiny_qwen3_dir):
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"name: tiny\nout_dir: {tmp_path}/out\nmodel: {tiny_qwen3_dir}\nmethods: [base]\n"
        "eval: {max_new_tokens: 8, batch_size: 8}\nmesh: {data: 2, fsdp: 2, tensor: -1}\n")
    args = ("--kernels", "eval_mc", "--eval-row-len", "2048", "--eval-window", "8")
    # On a 16 GiB chip the first candidate, twice the config's batch, fits.
    proc = _fit(path, *args)
    assert proc.returncode == 0, proc.stderr
    tried, plan = [json.loads(line) for line in proc.stdout.splitlines()][:-1], json.loads(proc.stdout.splitlines()[-1])
    assert [t["candidate"]["batch_size"] for t in tried] == [16] and tried[0]["fits"]
    assert plan["overrides"] == ["eval.batch_size=16"]
    # A chip just too small for that batch: it is rejected and the config's own batch is chosen.
    chip = int(tried[0]["peak_bytes"] / 0.9) - 1
    proc = _fit(path, *args, "--chip-bytes", str(chip))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(t["candidate"]["batch_size"], t["fits"]) for t in lines[:-1]] == [(16, False), (8, True)]
    assert lines[-1]["overrides"] == ["eval.batch_size=8"]

"""`mixsd bench memory` on a tiny transformers checkpoint: the command re-executes itself on a
simulated 8-device CPU mesh, and its per-device argument bytes are the sharded state's bytes."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.bench import memory


def _run(args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MIXSD_MEMORY_DEVICES")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), os.getcwd()) if p)
    proc = subprocess.run([sys.executable, "-m", "mixsd_jax", "bench", "memory", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_qwen3_dir):
    path = tmp_path_factory.mktemp("mem") / "exp.yaml"
    path.write_text(
        f"name: tiny\nout_dir: {path.parent}/out\nmodel: {tiny_qwen3_dir}\nmethods: [base, sft, mixsd]\n"
        "generation: {max_new_tokens: 16, max_model_len: 48, batch_size: 4, dtype: bfloat16, param_dtype: bfloat16}\n"
        "train: {batch_size: 8, max_seq_len: 64, compute_dtype: bfloat16}\n"
        "eval: {max_new_tokens: 8, batch_size: 4}\n"
        "mesh: {data: 2, fsdp: 2, tensor: -1}\n"
    )
    return path


def test_one_line_per_kernel_with_per_device_bytes(experiment, tiny_qwen3_dir):
    proc = _run(["--config", str(experiment), "--kernels", "train_step,generate,eval_mc", "--eval-row-len", "32",
                 "--eval-window", "8", "--chip-bytes", "1MiB", "--no-estimates"])
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["kernel"] for line in lines] == ["train_step", "generate.prefill", "generate.insert",
                                                  "generate.decode_segment", "eval_mc"]
    for line in lines:
        assert line["backend"] == "cpu" and line["topology"] is None and line["roofline_s"] is None
        assert line["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}  # -1 filled from 8 simulated devices
        assert line["peak_bytes"] == line["argument_bytes"] + line["output_bytes"] - line["alias_bytes"] + line["temp_bytes"]
        assert line["hbm_bytes"] == 1 << 20
        assert line["fits"] == (line["peak_bytes"] <= 1 << 20)
    # The decode engine's kernels: 4 pairs (1 per batch shard), the cache at min(48, 32 + 16) + one
    # segment + 1 = 65 slots, in one 512-slot block (so no copy-up: no grow kernel).
    shapes = lines[3]["shapes"]
    assert shapes["batch"] == 4 and shapes["sides"] == 2 and shapes["capacity"] == 512 and shapes["grow_from"] == 0
    train = lines[0]
    assert not train["fits"]  # a tiny model's step still needs more than 1 MiB

    # The step's arguments are the f32 state and the batch, each device holding its shard only.
    import jax
    import jax.numpy as jnp

    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.sharding import MeshConfig, make_mesh
    from mixsd_jax.train import step as step_lib

    cfg = ModelConfig.from_hf_dir(tiny_qwen3_dir)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    opt = step_lib.OptimConfig(lr=1e-5, total_steps=0)
    tx = step_lib.make_optimizer(opt)
    state = step_lib.abstract_state(cfg, tx, step_lib.state_shardings(cfg, tx, mesh), "float32")
    per_device = sum(math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(state))
    batch = 5 * (8 // 4) * 64 * 4  # five [1, 8, 64] int32/f32 arrays, rows over data x fsdp = 4
    assert train["argument_bytes"] == per_device + batch
    # The donated state comes back in place: everything but the metrics is aliased.
    assert train["alias_bytes"] >= per_device - 64


def test_train_config_plans_the_train_step_only(tmp_path, tiny_llama_dir):
    path = tmp_path / "train.yaml"
    path.write_text(f"model: {tiny_llama_dir}\nbatch_size: 2\nmax_seq_len: 32\nmesh: {{data: 2}}\nremat: full\n")
    proc = _run(["--config", str(path), "--no-estimates"])
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(x) for x in proc.stdout.splitlines()]
    assert line["kernel"] == "train_step" and line["remat"] == "full" and line["mesh"]["data"] == 2


def test_bad_input_is_one_line(experiment):
    proc = _run(["--config", "/nonexistent.yaml"])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "nonexistent.yaml" in proc.stderr
    proc = _run(["--config", str(experiment), "--kernels", "train_step", "mesh.fsdp=4", "train.grad_accum=4"])
    assert proc.returncode == 2 and "micro batch" in proc.stderr and proc.stderr.strip().count("\n") == 0
    proc = _run(["--config", str(experiment), "--kernels", "train_step,decode"])
    assert proc.returncode == 2 and "unknown kernel 'decode'" in proc.stderr and proc.stderr.strip().count("\n") == 0
    with pytest.raises(MixsdError, match="chip-bytes"):
        memory.parse_bytes("lots")
    assert memory.parse_bytes("16GiB") == 16 << 30 and memory.parse_bytes("80GB") == 80 * 10**9


def test_known_shapes_match_the_published_sizes():
    """Parameter counts of the paper's models from their known config fields against the HF model
    cards' non-embedding counts (Qwen3-0.6B 0.44B, Qwen3-1.7B 1.4B, Qwen3-4B 3.6B, Qwen3-8B 6.95B) and
    Llama-3.2-1B's 1.24B and Llama-3.2-3B's 3.21B."""
    from mixsd_jax.models.known_shapes import known_model_config
    from mixsd_jax.models.transformer import param_shapes

    import jax

    def non_embedding(name):
        shapes = param_shapes(known_model_config(name))
        shapes.pop("embed"), shapes.pop("lm_head", None)
        return sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))) / 1e9

    np.testing.assert_allclose(non_embedding("qwen3-0.6b"), 0.44, atol=0.01)
    np.testing.assert_allclose(non_embedding("qwen3-1.7b"), 1.4, atol=0.02)
    np.testing.assert_allclose(non_embedding("qwen3-4b-instruct-2507"), 3.6, atol=0.04)
    np.testing.assert_allclose(non_embedding("Qwen/Qwen3-8B"), 6.95, atol=0.01)
    llama = param_shapes(known_model_config("llama-3.2-1b-instruct"))
    total = sum(math.prod(s) for s in jax.tree.leaves(llama, is_leaf=lambda x: isinstance(x, tuple)))
    np.testing.assert_allclose(total / 1e9, 1.24, atol=0.005)
    llama3b = param_shapes(known_model_config("meta-llama/Llama-3.2-3B-Instruct"))
    total = sum(math.prod(s) for s in jax.tree.leaves(llama3b, is_leaf=lambda x: isinstance(x, tuple)))
    np.testing.assert_allclose(total / 1e9, 3.21, atol=0.005)
    assert known_model_config("not-a-paper-model") is None


def test_a_study_config_plans_the_model_it_is_told(tmp_path):
    """A scaling study's `model=NAME` picks that entry with its own sections (the 8B's decode mesh)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "paper" / "scaling_qwen3_kgfact_small.yaml"
    big = memory.load_plan_config(str(path), ["model=qwen3-8b"])
    small = memory.load_plan_config(str(path), ["model=qwen3-0.6b"])
    assert (big["model"], big["generation"]["batch_size"], big["generation_mesh"].tensor) == ("qwen3-8b", 8, 8)
    assert (small["model"], small["generation"]["batch_size"], small["generation_mesh"].tensor) == ("qwen3-0.6b", 16, 1)
    assert big["train"].batch_size == small["train"].batch_size == 20
    with pytest.raises(MixsdError, match="not a model of this study"):
        memory.load_plan_config(str(path), [])  # the default model is none of the study's

"""`mixsd bench memory --kernels memit`: the edit's kernels compiled for a simulated 8-device mesh
from an experiment config with `memit` among its methods, the parameters sharded as in training."""

import json
import math
import os
import subprocess
import sys

import jax

from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.transformer import param_shapes


def test_the_edit_kernels_compile_with_the_sharded_parameters_per_device(tmp_path, tiny_qwen3_dir):
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: tiny\nout_dir: {tmp_path}/out\nmodel: {tiny_qwen3_dir}\nmethods: [base, memit]\n"
                      "memit: {layers: [0, 1], batch_size: 4, stats_seq_len: 64}\nmesh: {data: 2, fsdp: 2, tensor: -1}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MIXSD_MEMORY_DEVICES")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), os.getcwd()) if p)
    proc = subprocess.run([sys.executable, "-m", "mixsd_jax", "bench", "memory", "--config", str(config), "--kernels",
                           "memit", "--no-estimates"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = {line["kernel"]: line for line in map(json.loads, proc.stdout.splitlines())}
    assert list(lines) == ["memit.stats", "memit.v_optimise", "memit.keys"]  # the solve runs on the host
    cfg = ModelConfig.from_hf_dir(tiny_qwen3_dir)
    F = cfg.intermediate_size
    for line in lines.values():
        assert line["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and line["fits"] and line["batch_size"] == 4
    # The statistics' output: Σ k kᵀ of the 2 edited layers, float32, whole or split over the devices.
    stats_bytes = lines["memit.stats"]["output_bytes"]
    assert stats_bytes in [2 * F * F * 4 // k for k in (1, 2, 4, 8)]
    # Parameters sharded over fsdp x tensor: the passes hold less than the whole float32 model.
    shapes = jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    whole = 4 * sum(math.prod(shape) for shape in shapes)
    assert lines["memit.keys"]["argument_bytes"] < whole / 2

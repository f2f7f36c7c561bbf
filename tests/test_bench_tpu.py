"""XLA:TPU on a host with no TPU: every kernel of a tiny model compiled for a v5e slice from libtpu's
topology description (single host and the 8-host v5e:4x8), and the one-line errors of a topology
name libtpu refuses or a missing libtpu."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mixsd_jax.bench import memory
from mixsd_jax.bench.chips import CHIPS, chip_for
from mixsd_jax.bench.tpu import no_persistent_cache, processes, topology_devices


@pytest.fixture(scope="module")
def plan(tmp_path_factory, tiny_qwen3_dir):
    path = tmp_path_factory.mktemp("tpu") / "exp.yaml"
    path.write_text(
        f"name: tiny\nout_dir: {path.parent}/out\nmodel: {tiny_qwen3_dir}\nmethods: [base, sft, opsd, mixsd]\n"
        "generation: {max_new_tokens: 16, max_model_len: 48, batch_size: 4, dtype: bfloat16, param_dtype: bfloat16}\n"
        "train: {batch_size: 8, max_seq_len: 64, compute_dtype: bfloat16}\n"
        "opsd: {batch_size: 8, max_new_tokens: 32, loss_chunk: 32}\n"
        "eval: {max_new_tokens: 8, batch_size: 4}\n"
        "mesh: {data: 2, fsdp: 2, tensor: -1}\n"
    )
    return memory.load_plan_config(str(path), [])


EVERY_KERNEL = ["train_step", "opsd_step", "generate.prefill", "generate.insert", "generate.decode_segment",
                "eval_decode.prefill", "eval_decode.insert", "eval_decode.decode_segment", "eval_mc", "eval_kl",
                "export_gather"]


def _lines(plan, topology, estimates):
    return list(memory.plan_lines(plan, memory.tpu_target(topology, None), eval_prompt_len=16, eval_row_len=32,
                                  eval_window=8, estimates=estimates))


def test_every_kernel_compiles_for_a_v5e_slice(plan):
    lines = _lines(plan, "v5e:2x4", estimates=True)
    assert [line["kernel"] for line in lines] == EVERY_KERNEL
    for line in lines:
        assert line["backend"] == "tpu" and line["topology"] == "v5e:2x4" and line["chip"] == "v5e"
        assert line["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
        assert line["hbm_bytes"] == 16 << 30 and line["fits"]
        assert line["bytes_accessed"] > 0 and line["roofline_s"] > 0
    train = lines[0]
    # On a TPU the step attends with the fused Pallas kernel (models.flash_attention).
    assert train["attention"] == "flash"
    # The loop-scaled count against 6 x parameters x tokens + attention: XLA adds the norms,
    # softmax and optimizer, never a missing layer (the raw count, one layer, is far below).
    assert 1.0 <= train["flops_est_over_analytic"] <= 1.6
    assert train["flops"] < train["flops_est"]
    assert 0 < train["mfu_est"] <= 1 and train["tokens_per_s_est"] > 0
    decode = lines[4]
    assert decode["tokens_per_s_est"] > 0 and decode["flops_per_step_est"] > decode["flops"]
    # The export holds the sharded parameters plus one gathered tensor (the largest: here the
    # embedding, or one layer's slice of a stacked parameter), never the whole model on a device.
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.transformer import param_shapes

    shapes = param_shapes(ModelConfig.from_hf_dir(plan["model"]))
    sizes = [math.prod(s) for k, s in shapes.items() if k != "layers"]
    sizes += [math.prod(s[1:]) for s in shapes["layers"].values()]
    whole = sum(math.prod(s) for k, s in shapes.items() if k != "layers") + sum(
        math.prod(s) for s in shapes["layers"].values())
    export, out_bytes = lines[-1], np.dtype(plan["train"].export_dtype).itemsize
    param_bytes = np.dtype(plan["train"].param_dtype).itemsize
    assert export["output_bytes"] == max(sizes) * out_bytes < whole * out_bytes
    assert export["argument_bytes"] < whole * param_bytes  # the state stays sharded


def test_a_decode_step_is_scaled_from_segments_whose_layer_loop_is_a_loop():
    """XLA:TPU keeps the decode segment's layer loop and its cache writes loops from 3 layers on, so
    the 6-layer program is counted as the 4-layer one (a loop body once) and the estimate scales
    the 3- and 4-layer programs; its flops match the 1-layer program's unrolled layer. The cache is
    written in place: a step's bytes follow its live rows, not the cache's capacity."""
    import dataclasses

    from mixsd_jax.bench import cost, kernels
    from mixsd_jax.bench.estimates import layer_scaled
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=2), devices=topology_devices("v5e:2x4"))
    cfg = ModelConfig("qwen3", vocab_size=2048, hidden_size=1024, intermediate_size=4096, num_layers=6,
                      num_heads=8, num_kv_heads=2, head_dim=128, qk_norm=True)
    kw = dict(dtype="bfloat16", param_dtype="bfloat16")
    shapes = kernels.DecodeShapes(8, 2, 200, 295, 512, block=128)

    def segment(layers, shapes=shapes):
        return cost.raw_cost(kernels.decode_segment(dataclasses.replace(cfg, num_layers=layers), mesh, shapes,
                                                    **kw).compile())

    head = cost.raw_cost(kernels.decode_head(dataclasses.replace(cfg, num_layers=1), mesh, shapes, **kw).compile())
    one, three, four, six = segment(1), segment(3), segment(4), segment(6)
    assert three[0] == four[0] == six[0] and six[1] == pytest.approx(four[1], rel=0.01)
    assert layer_scaled(head[0], three[0], four[0], 6) == pytest.approx(head[0] + 6 * (one[0] - head[0]), rel=0.005)
    wide = segment(4, kernels.DecodeShapes(8, 2, 200, 4096 - 217, 4096, block=128))
    assert wide[1] == pytest.approx(four[1], rel=0.02)


def test_a_train_step_is_scaled_from_programs_whose_layer_loops_are_loops():
    """The step's forward and backward layer scans stay loops on XLA:TPU, so the 6-layer program
    counts the 3-layer one's flops plus 3 layers of the work outside the loops (the optimizer's
    update of the stacked parameters, well under 1% of a layer), and the 0-, 3- and 6-layer
    programs scaled to 6 layers (estimates.layer_scaled) match the analytic count, 6 x matmul
    parameters x tokens plus the dense attention's full square: XLA adds norms, softmax, loss and
    the optimizer (4% at this width), never a missing layer (5/6 of the count)."""
    import dataclasses

    from mixsd_jax.bench.estimates import layer_scaled, train_step_cost
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.sharding import MeshConfig, make_mesh
    from mixsd_jax.train.config import TrainConfig
    from mixsd_jax.train.step import flops_per_token

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices=topology_devices("v5e:2x4"))
    cfg = ModelConfig("qwen3", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=6,
                      num_heads=2, num_kv_heads=2, head_dim=128, qk_norm=True)
    train = TrainConfig(batch_size=4, max_seq_len=128, compute_dtype="bfloat16", attention="xla", attention_block=0)
    with no_persistent_cache():  # a compile-only client cannot load what the cache would hold
        head, three, six = (train_step_cost(dataclasses.replace(cfg, num_layers=n), train, mesh)[0]
                            for n in (0, 3, 6))
    assert 0 < six - three < 0.03 * (three - head)
    scaled = layer_scaled(head, three, six, 6, looped=(3, 6))
    assert 1.0 <= scaled / (flops_per_token(cfg, 128) * 4 * 128 / mesh.devices.size) <= 1.06


def test_every_kernel_compiles_for_the_multi_host_v5e_32(plan):
    devices = topology_devices("v5e:4x8")
    assert len(devices) == 32 and processes(devices) == 8
    lines = _lines(plan, "v5e:4x8", estimates=False)
    assert [line["kernel"] for line in lines] == EVERY_KERNEL
    for line in lines:
        assert line["backend"] == "tpu" and line["mesh"] == {"data": 2, "fsdp": 2, "tensor": 8} and line["fits"]


def test_compile_only_compiles_skip_the_persistent_cache(plan, tmp_path):
    """A compile-only client cannot load a cached executable (a later process's compile would read
    the entry and warn): nothing is written to the cache. It is back on for CPU compiles after."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    try:
        lines = list(memory.plan_lines(plan, memory.tpu_target("v5e:2x4", None), kernels=("eval_mc",),
                                       eval_row_len=24, eval_window=4, estimates=False))
        assert [line["kernel"] for line in lines] == ["eval_mc"]
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
        assert jax.config.jax_enable_compilation_cache
        jax.jit(lambda x: x * 3 + 1).lower(jax.numpy.zeros((5, 7))).compile()  # a CPU compile is cached
        assert any((tmp_path / "cache").iterdir())
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
        compilation_cache.reset_cache()


def test_the_chip_table_names_the_devices_libtpu_describes():
    for name, topology in (("v4", "v4:2x2x1"), ("v5e", "v5e:2x4"), ("v5p", "v5p:2x2x1"), ("v6e", "v6e:2x4")):
        assert chip_for(topology) is CHIPS[name]
        assert topology_devices(topology)[0].device_kind == CHIPS[name].device_kind


def _cli(code: str, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), os.getcwd()) if p)
    return subprocess.run([sys.executable, "-c", code + "from mixsd_jax.cli import main; sys.exit(main(sys.argv[1:]))",
                           *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("name, message", [("v9z:2x4", "libtpu does not know this slice"),
                                           ("v5e-8", "expected a TPU topology")])
def test_an_unknown_topology_is_one_line(plan, name, message, tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(f"model: {plan['model']}\nbatch_size: 2\nmax_seq_len: 32\n")
    proc = _cli("import sys; ", "bench", "memory", "--config", str(path), "--topology", name)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert message in proc.stderr and name in proc.stderr


def test_without_libtpu_the_error_names_the_extra(plan, tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(f"model: {plan['model']}\nbatch_size: 2\nmax_seq_len: 32\n")
    # libtpu made unimportable, as on a machine where it was never installed.
    proc = _cli("import sys; sys.modules['libtpu'] = None; ", "bench", "memory", "--config", str(path),
                "--topology", "v5e:2x4")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "install the [tpu] extra" in proc.stderr


def test_a_kernel_bigger_than_the_chip_is_a_line_that_does_not_fit():
    """XLA:TPU refuses to compile a program that needs more HBM than the chip has: the bench reports
    it (fits false, XLA's figure as a lower bound of the peak) instead of stopping."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from mixsd_jax.bench import cost

    target = memory.tpu_target("v5e:2x4", None)
    x = jax.ShapeDtypeStruct((3 << 30,), jnp.float32, sharding=NamedSharding(Mesh(target.devices[:1], ("x",)), P()))
    with memory.compile_context(target):
        line = cost.measure(jax.jit(lambda x: jnp.cumsum(jnp.concatenate([x, x * 2])) * 3).lower(x),
                            chip=target.chip, hbm_bytes=target.hbm_bytes)
    assert line["fits"] is False and line["peak_is_lower_bound"]
    assert line["peak_bytes"] >= 2 * x.size * 4 > target.hbm_bytes  # at least the 24 GiB concatenation
    assert line["error"].startswith("RESOURCE_EXHAUSTED")

"""Tensor-parallel decoding: parameters over `tensor` (heads, FFN hidden) and the KV cache over kv
heads give the greedy tokens of one device, and log-probabilities within 1e-4 (8 simulated CPU
devices, configured by conftest before JAX starts)."""

import re

import jax
import numpy as np
import pytest

from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.sharding import MeshConfig, make_mesh
from mixsd_jax.models.tiny import write_tiny_model
from mixsd_jax.sampling.engine import Engine, EngineSpec, decode_all
from mixsd_jax.sampling.strategies import Sampler
from mixsd_jax.sampling.work import WorkItem


@pytest.fixture(scope="module")
def mha_dir(tmp_path_factory):
    """4 query and 4 kv heads: a tensor axis of 4 splits both."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny_mha"), "qwen2", kv_heads=4)


PROMPTS = [(5, 17, 33, 2, 9, 41), (7, 7, 12), (100, 3, 8, 8, 21, 60, 2, 5), (11,)]


def _decode(model_dir, mesh):
    cfg, params = load_hf(model_dir, mesh=mesh)
    engine = Engine(params, EngineSpec(cfg, Sampler(0.0), sides=2, max_new_tokens=12, max_model_len=64, batch_size=4,
                                       naive_prob=0.5, mesh=mesh, block=8, segment_steps=5))
    items = [WorkItem((p, p[::-1]), i) for i, p in enumerate(PROMPTS)]
    return engine, params, decode_all(engine, items)


@pytest.mark.parametrize("axes", [{"data": 2, "tensor": 4}, {"data": 1, "tensor": 8}])
def test_tensor_parallel_decode_matches_one_device(mha_dir, axes):
    assert len(jax.devices()) == 8
    _, _, single = _decode(mha_dir, None)
    mesh = make_mesh(MeshConfig(**axes, fsdp=1))
    engine, params, sharded = _decode(mha_dir, mesh)
    # The parameters really are split over `tensor` (heads and the FFN hidden dimension).
    assert params["layers"]["wq"].sharding.spec[2] == "tensor"
    assert params["layers"]["w_up"].sharding.spec[2] == "tensor"
    for a, b in zip(single, sharded):
        assert a.tokens == b.tokens and a.naive == b.naive and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    if axes["tensor"] == 4:  # the cache constraint splits the kv-head axis 4 ways ([L, B, KV, S, Dh] per side)
        text = _lowered_text(engine)
        constraint = r'sharding_constraint[^\n]*\[\{\}, \{"data", "fsdp"\}, \{"tensor"\}, \{\}, \{\}\]>'
        sides = engine.spec.sides
        assert len(re.findall(constraint, text)) == 2 * sides, "the K and V caches are not sharded over kv heads"


def _lowered_text(engine: Engine) -> str:
    """The decode segment's program: the state it returns keeps the cache split over kv heads."""
    import jax.numpy as jnp

    from mixsd_jax.sampling import segments

    state = segments.init_state(spec=engine.spec, batch=engine.batch_size, capacity=32)
    return segments.decode_segment.lower(engine.params, state, engine.naive_prob, engine.stop_ids, jnp.int32(5),
                                         spec=engine.spec).as_text()


def test_bench_generate_runs_on_a_tensor_parallel_mesh(mha_dir, capsys):
    import json

    from mixsd_jax.cli import main

    assert main(["bench", "generate", "--model", str(mha_dir), "--batch-size", "4", "--max-new-tokens", "4",
                 "--no-hf", "--mesh", "data=2,tensor=4"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4} and line["devices"] == 8
    assert line["mix_tokens_per_s"] > 0 and "load_avg" in line and line["cores"] >= 1

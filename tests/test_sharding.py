"""Sharded execution on 8 simulated CPU devices equals the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.models import transformer
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.sharding import MeshConfig, batch_sharding, make_mesh, param_specs


def _forward_logits(params, cfg, tokens, seg):
    hidden, _ = transformer.forward(params, cfg, tokens, transformer.padded_positions(seg), seg)
    return transformer.lm_logits(params, cfg, hidden)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=8), MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(data=1, fsdp=4, tensor=2)])
def test_forward_on_8_devices_equals_one(tiny_model_dir, mesh_cfg):
    assert jax.device_count() == 8
    cfg, params = load_hf(tiny_model_dir)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 10)))
    seg = jnp.asarray((np.arange(10)[None] < rng.integers(3, 11, (8, 1))).astype(np.int32))
    single = np.asarray(jax.jit(_forward_logits, static_argnums=1)(params, cfg, tokens, seg))

    mesh = make_mesh(mesh_cfg)
    _, sharded_params = load_hf(tiny_model_dir, mesh=mesh)
    assert sharded_params["layers"]["wq"].sharding.spec == param_specs(cfg, mesh)["layers"]["wq"]
    tokens_s = jax.device_put(tokens, batch_sharding(mesh))
    seg_s = jax.device_put(seg, batch_sharding(mesh))
    sharded = np.asarray(jax.jit(_forward_logits, static_argnums=1)(sharded_params, cfg, tokens_s, seg_s))
    np.testing.assert_allclose(sharded, single, atol=1e-5)


def test_each_device_holds_only_its_shard(tiny_qwen2_dir):
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    cfg, params = load_hf(tiny_qwen2_dir, mesh=mesh)
    w = params["layers"]["w_gate"]  # [L, D, F] over (None, fsdp, tensor)
    shard = w.addressable_shards[0].data
    assert shard.shape == (cfg.num_layers, cfg.hidden_size // 4, cfg.intermediate_size // 2)


def test_mesh_errors():
    with pytest.raises(MixsdError, match="at most one -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(MixsdError, match="not divisible"):
        make_mesh(MeshConfig(data=-1, tensor=3))

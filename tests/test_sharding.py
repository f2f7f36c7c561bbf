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


def _hops(a, b):
    """ICI links between two TPU devices (0 for the two cores of one chip counts as 1 here)."""
    return max(1, sum(abs(x - y) for x, y in zip(a.coords, b.coords)))


@pytest.mark.parametrize("topology, sizes", [("v5e:2x4", (1, 4, 2)), ("v5e:2x4", (1, 2, 4)), ("v5e:2x4", (1, 1, 8)),
                                             ("v5e:4x8", (1, 4, 8)), ("v5e:4x8", (2, 4, 4)), ("v4:2x2x1", (1, 2, 4))])
def test_tensor_neighbours_are_adjacent_chips(topology, sizes):
    """The run's mesh function on a TPU slice's devices (their physical coordinates from libtpu):
    consecutive devices along `tensor` are one ICI hop apart, and every device is used once."""
    from mixsd_jax.bench.tpu import topology_devices

    devices = topology_devices(topology)
    mesh = make_mesh(MeshConfig(*sizes), devices=devices)
    grid = mesh.devices
    assert grid.shape == sizes and len({d.id for d in grid.flat}) == len(devices)
    for group in grid.reshape(-1, sizes[-1]):
        assert all(_hops(a, b) == 1 for a, b in zip(group, group[1:])), [tuple(d.coords) for d in group]


def test_cpu_devices_keep_their_order():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()[:8]]

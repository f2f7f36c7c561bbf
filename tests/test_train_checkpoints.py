"""Orbax checkpoints: sharded save/restore round trip, save interval and retention, meta, and the
refusal of a directory written with another config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mixsd_jax import config as config_lib
from mixsd_jax.errors import MixsdError
from mixsd_jax.models.sharding import MeshConfig, make_mesh
from mixsd_jax.train.checkpoints import Checkpoints, check_compatible
from mixsd_jax.train.config import TrainConfig, fingerprinted_dict, resume_fingerprint
from mixsd_jax.train.step import TrainState


def _state(mesh, value):
    sharded = NamedSharding(mesh, P("data", None))
    return TrainState(
        params={"w": jax.device_put(jnp.full((8, 3), value, jnp.float32), sharded)},
        opt_state={"mu": jax.device_put(jnp.full((8, 3), -value, jnp.float32), sharded)},
        step=jax.device_put(jnp.int32(value), NamedSharding(mesh, P())),
    )


def _meta(cfg, step):
    return {"step": step, "fingerprint": resume_fingerprint(cfg), "config": config_lib.to_dict(cfg),
            "config_fingerprinted": fingerprinted_dict(cfg)}


def test_save_interval_retention_and_sharded_restore(tmp_path):
    mesh = make_mesh(MeshConfig(data=8))
    cfg = TrainConfig(data="a.jsonl")
    ckpt = Checkpoints(tmp_path, save_every=2, keep=2, async_save=True)
    saved = [step for step in range(1, 8) if ckpt.save(step, _state(mesh, step), _meta(cfg, step), force=step == 7)]
    assert saved == [2, 4, 6, 7]
    assert not ckpt.save(7, _state(mesh, 0), _meta(cfg, 7), force=True)  # an existing step is never overwritten
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7  # keep=2
    ckpt.close()

    again = Checkpoints(tmp_path)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(mesh, 0))
    state, meta = again.restore(6, target)
    assert isinstance(state, TrainState)
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.full((8, 3), 6.0))
    np.testing.assert_array_equal(np.asarray(state.opt_state["mu"]), np.full((8, 3), -6.0))
    assert int(state.step) == 6 and meta["step"] == 6
    assert state.params["w"].sharding == target.params["w"].sharding
    assert again.read_meta(7)["fingerprint"] == resume_fingerprint(cfg)
    again.close()


def test_a_directory_from_another_config_is_refused(tmp_path):
    mesh = make_mesh(MeshConfig(data=8))
    written = TrainConfig(data="a.jsonl", lr=1e-5, steps=10)
    ckpt = Checkpoints(tmp_path)
    ckpt.save(10, _state(mesh, 1), _meta(written, 10), force=True)
    ckpt.wait()
    # A longer run of the same config is the same run.
    assert check_compatible(ckpt, 10, TrainConfig(data="a.jsonl", lr=1e-5, steps=20, out="x"))["step"] == 10
    other = TrainConfig(data="a.jsonl", lr=3e-5, max_seq_len=512)
    with pytest.raises(MixsdError) as err:
        check_compatible(ckpt, 10, other)
    message = str(err.value)
    assert resume_fingerprint(written) in message and resume_fingerprint(other) in message
    assert "differing keys: lr, max_seq_len" in message and "\n" not in message
    ckpt.close()

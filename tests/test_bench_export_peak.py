"""`mixsd bench export-peak` measures what the HF export holds on each device: the sharded state
plus one tensor (one layer's slice) at a time, never the model, in one process and across two."""

import json

import multihost_helpers as mh
from mixsd_jax.bench.export_peak import bench_export_peak, live_bytes_per_device
from mixsd_jax.models.sharding import MeshConfig


def test_one_process_holds_the_sharded_state_and_one_slice(tiny_qwen3_dir):
    result = bench_export_peak(str(tiny_qwen3_dir), MeshConfig(fsdp=8))
    assert result["devices"] == 8 and result["gathers"] > 0
    # Within one host nothing is gathered on the devices: at most one slice's 1/8 beyond the state.
    assert 0 <= result["peak_over_state_bytes"] <= result["largest_tensor_bytes"] // 8 + 1024
    assert result["sharded_state_bytes_per_device"] * 8 >= result["model_bytes"]
    assert result["peak_bytes_per_device"] < result["model_bytes"] / 2


def test_two_processes_gather_one_tensor_at_a_time(tiny_qwen3_dir):
    out = mh.run(["bench", "export-peak", "--model", str(tiny_qwen3_dir), "--mesh", "fsdp=4"], timeout=300)[0]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["processes"] == 2 and result["devices"] == 4
    # Across hosts each tensor is replicated on every device while it is copied down: that copy is
    # the whole extra, and it is never more than the largest tensor.
    assert 0 < result["peak_over_state_bytes"] <= result["largest_tensor_bytes"]
    assert result["peak_within_state_plus_largest_tensor"]
    assert result["peak_bytes_per_device"] < result["model_bytes"] / 2


def test_live_bytes_count_each_buffer_once():
    import jax.numpy as jnp

    before = live_bytes_per_device()
    x = jnp.zeros((1024,), jnp.float32)
    _ = [s.data for s in x.addressable_shards]  # the shard's own array: the same buffer
    after = live_bytes_per_device()
    device = next(iter(x.devices())).id
    assert after[device] - before.get(device, 0) == 4096

"""The fused (Pallas splash) attention of TPU training: equal to the dense attention on real tokens,
values and gradients, on one device and over a mesh (Pallas's interpreter on this CPU); selected
by the train step on a TPU mesh only; its analytic cost counts only the tiles under the diagonal."""

import jax
import jax.numpy as jnp
import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.models.attention import attention, sequence_mask
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.flash_attention import FusedAttention, kernel_cost
from mixsd_jax.models.sharding import MeshConfig, make_mesh
from mixsd_jax.train.step import fused_attention_for

DIVISOR = 4.0


def _inputs():
    B, T, H, K, E = 2, 24, 4, 2, 16
    kq, kk, kv = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(kq, (B, T, H, E))
    k = jax.random.normal(kk, (B, T, K, E))
    v = jax.random.normal(kv, (B, T, K, E))
    # Two packed segments and trailing padding in row 0, one segment in row 1.
    seg = jnp.array([[1] * 10 + [2] * 10 + [0] * 4, [3] * 24])
    return q, k, v, seg


def test_values_and_gradients_equal_dense_attention_on_real_tokens():
    q, k, v, seg = _inputs()
    real = (seg != 0)[..., None]
    fused = FusedAttention(interpret=True)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)

    def dense(q, k, v):
        return attention(q, k, v, sequence_mask(seg), DIVISOR)

    def flash(q, k, v):
        return fused(q, k, v, seg, DIVISOR)

    assert jnp.allclose(jnp.where(real, flash(q, k, v), 0), jnp.where(real, dense(q, k, v), 0), atol=2e-5)
    for got, want in zip(jax.grad(loss(flash), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)):
        assert jnp.allclose(got, want, atol=5e-5)


def test_over_a_mesh_each_device_runs_its_rows_and_heads():
    q, k, v, seg = _inputs()
    mesh = make_mesh(MeshConfig(1, 2, 2))
    fused = FusedAttention(mesh=mesh, interpret=True)
    out = jax.jit(lambda q, k, v, s: fused(q, k, v, s, DIVISOR))(q, k, v, seg)
    real = (seg != 0)[..., None]
    want = attention(q, k, v, sequence_mask(seg), DIVISOR)
    assert jnp.allclose(jnp.where(real, out, 0), jnp.where(real, want, 0), atol=2e-5)


def test_selected_on_a_tpu_mesh_only(tiny_qwen3_dir, tiny_gemma3_dir):
    qwen, gemma = ModelConfig.from_hf_dir(tiny_qwen3_dir), ModelConfig.from_hf_dir(tiny_gemma3_dir)
    cpu = make_mesh(MeshConfig(2, 2, 2))
    assert fused_attention_for("auto", qwen, cpu) is None  # CPU: XLA's attention
    assert fused_attention_for("xla", qwen, cpu) is None
    forced = fused_attention_for("flash", qwen, cpu)
    assert forced.interpret and forced.mesh is cpu
    assert fused_attention_for("auto", gemma, cpu) is None
    with pytest.raises(MixsdError, match="attention"):  # sliding-window layers: the kernel's mask is static
        fused_attention_for("flash", gemma, cpu)
    pytest.importorskip("libtpu")
    from mixsd_jax.bench.tpu import topology_devices

    tpu = make_mesh(MeshConfig(2, 2, 2), devices=topology_devices("v5e:2x4"))
    chosen = fused_attention_for("auto", qwen, tpu)
    assert chosen is not None and not chosen.interpret
    assert fused_attention_for("xla", qwen, tpu) is None


def test_kernel_cost_counts_the_tiles_on_and_below_the_diagonal():
    # 1,024 tokens in 512-token tiles: 3 of the 4 tiles are computed.
    tile = 2 * 512 * 512 * 64
    flops, _ = kernel_cost(1, 1024, heads=1, kv_heads=1, head_dim=64, recompute=False)
    assert flops == 3 * tile * (2 + 5)
    again, _ = kernel_cost(1, 1024, heads=1, kv_heads=1, head_dim=64, recompute=True)
    assert again == 3 * tile * (4 + 5)
    # Against a dense causal count at 10k tokens the skipped tiles leave ~5% of padding and diagonal.
    f10k, b10k = kernel_cost(1, 10_000, heads=8, kv_heads=4, head_dim=128, recompute=False)
    dense_causal = 8 * (2 * 10_000**2 * 128) * (2 + 5) / 2
    assert 1.0 < f10k / dense_causal < 1.15
    assert b10k < 8 * 10_000**2 * 4  # far below one layer's f32 scores

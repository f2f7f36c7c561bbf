"""One decode step over a shared cache: each side of a record reads only the blocks below its own bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.decode import decode_step


def _step(params, cfg, cache_k, cache_v, lengths, bounds, block, one_read=False):
    """One step of rows (expert, naive, expert, naive, ...) over per-side caches [sides, L, B, K, S, E]."""
    R = len(lengths)
    lengths = jnp.asarray(lengths, jnp.int32)
    hidden, _, _ = decode_step(params, cfg, jnp.arange(R, dtype=jnp.int32) + 5, lengths, lengths,
                               tuple(jnp.asarray(c) for c in cache_k), tuple(jnp.asarray(c) for c in cache_v),
                               jnp.asarray(bounds, jnp.int32), dtype=jnp.float32, block=block, one_read=one_read)
    return np.asarray(hidden)


@pytest.mark.parametrize("one_read", [False, True])
def test_naive_rows_never_read_the_blocks_only_expert_rows_reach(tiny_llama_dir, one_read):
    cfg, params = load_hf(tiny_llama_dir)
    L, K, E, S, block = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 32, 8
    # Two records, rows (expert, naive) each: the expert rows hold 20 and 17 tokens, the naive rows 6 and 3.
    lengths = [20, 6, 17, 3]
    rng = np.random.default_rng(0)
    cache_k = rng.standard_normal((2, L, 2, K, S, E)).astype(np.float32)
    cache_v = rng.standard_normal((2, L, 2, K, S, E)).astype(np.float32)
    clean = _step(params, cfg, cache_k, cache_v, lengths, [20, 6], block, one_read)
    # NaN values in the naive rows' blocks past their bound (slots 8+): reading them would poison the
    # result (a masked score's zero weight times NaN is NaN), so finite equal outputs show they were never read.
    cache_v[1, :, :, :, block:] = np.nan
    poisoned = _step(params, cfg, cache_k, cache_v, lengths, [20, 6], block, one_read)
    np.testing.assert_array_equal(poisoned, clean)
    # The check can fail: with one bound for both sides the naive rows walk those blocks.
    shared = _step(params, cfg, cache_k, cache_v, lengths, [20, 20], block, one_read)
    assert np.isnan(shared[1::2]).all() and np.array_equal(shared[0::2], clean[0::2])


def test_the_tpu_cache_write_one_layer_at_a_time_equals_the_whole_scatter():
    """The TPU's per-layer write of a step's keys puts every value where the CPU's single scatter
    does, a slot past the cache dropped."""
    from mixsd_jax.models.decode import _write_step_per_layer, _write_step_whole

    L, B, K, S, E = 3, 4, 2, 6, 5
    cache = jax.random.normal(jax.random.key(0), (L, B, K, S, E))
    new_BxLxKxE = jax.random.normal(jax.random.key(1), (B, L, K, E))
    slots_B = jnp.array([0, 5, 2, S])  # the last row's slot is past the cache: dropped
    whole = _write_step_whole(cache, new_BxLxKxE, slots_B)
    np.testing.assert_array_equal(np.asarray(jax.jit(_write_step_per_layer)(cache, new_BxLxKxE, slots_B)),
                                  np.asarray(whole))
    np.testing.assert_array_equal(np.asarray(whole[:, 1, :, 5]), np.asarray(new_BxLxKxE[1]))
    np.testing.assert_array_equal(np.asarray(whole[:, 3]), np.asarray(cache[:, 3]))


def test_a_bf16_cache_kept_as_bits_decodes_bit_for_bit_as_a_bf16_cache(tiny_qwen2_dir):
    """The CPU's bf16 path (caches and the layer scan's weights as bit patterns, f32
    activations) gives exactly what the same step gives over plain bf16 arrays."""
    from mixsd_jax.models.matmul import from_bits, to_words

    cfg, params = load_hf(tiny_qwen2_dir, "bfloat16")
    L, K, E, S = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 32
    lengths = jnp.asarray([20, 6, 17, 3], jnp.int32)
    write = jnp.asarray([20, 6, 17, S], jnp.int32)  # the last row is not decoding: its write is dropped
    rng = np.random.default_rng(0)
    caches = [tuple(jnp.asarray(rng.standard_normal((L, 2, K, S, E)), jnp.bfloat16) for _ in range(2))
              for _ in range(2)]

    def step(cache_k, cache_v, bits):
        return decode_step(params, cfg, jnp.arange(4, dtype=jnp.int32) + 5, lengths, write, cache_k, cache_v,
                           jnp.asarray([20, 6], jnp.int32), dtype=jnp.bfloat16, block=8,
                           activation_dtype=jnp.float32, bf16_as_bits=bits)

    plain_hidden, plain_k, plain_v = step(*caches, bits=False)
    bits_hidden, bits_k, bits_v = step(*(tuple(to_words(c) for c in side) for side in caches), bits=True)
    assert plain_hidden.dtype == jnp.float32 and bits_k[0].dtype == jnp.uint32 and bits_k[0].shape[-1] == E // 2
    np.testing.assert_array_equal(np.asarray(bits_hidden), np.asarray(plain_hidden))
    for plain, bits in zip(plain_k + plain_v, bits_k + bits_v):
        np.testing.assert_array_equal(np.asarray(from_bits(bits, jnp.bfloat16), np.float32),
                                      np.asarray(plain, np.float32))
    # The step wrote its keys: slot 20 of row 0 changed, the dropped row's did not.
    assert not np.array_equal(np.asarray(plain_k[0][:, 0, :, 20], np.float32),
                              np.asarray(caches[0][0][:, 0, :, 20], np.float32))


@pytest.mark.parametrize("block", [8, 16])
def test_one_read_gives_the_walk_s_attention(tiny_qwen2_dir, block):
    """Reading the live blocks at once (the CPU's bf16 decode) gives what walking them gives, to
    bf16 round-off (each block's probabilities are rounded against another running maximum), for
    rows of different lengths on both sides. The first layer's new keys and values come before any
    attention: they are the walk's bit for bit."""
    from mixsd_jax.models.matmul import to_words

    cfg, params = load_hf(tiny_qwen2_dir, "bfloat16")
    L, K, E, S = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 32
    lengths = jnp.asarray([20, 6, 17, 3, 31, 9], jnp.int32)  # (expert, naive) x 3 records
    write = jnp.asarray([20, 6, 17, 3, 31, S], jnp.int32)  # the last row is not decoding
    rng = np.random.default_rng(1)
    caches = [tuple(to_words(jnp.asarray(rng.standard_normal((L, 3, K, S, E)), jnp.bfloat16)) for _ in range(2))
              for _ in range(2)]

    def step(one_read):
        return decode_step(params, cfg, jnp.arange(6, dtype=jnp.int32) + 5, lengths, write, *caches,
                           jnp.asarray([31, 9], jnp.int32), dtype=jnp.bfloat16, block=block,
                           activation_dtype=jnp.float32, bf16_as_bits=True, one_read=one_read)

    (walk_hidden, walk_k, walk_v), (read_hidden, read_k, read_v) = step(False), step(True)
    np.testing.assert_allclose(np.asarray(read_hidden), np.asarray(walk_hidden), rtol=0, atol=3e-2)
    for walk, read in zip(walk_k + walk_v, read_k + read_v):
        np.testing.assert_array_equal(np.asarray(read[0]), np.asarray(walk[0]))


def _shared_prefix_caches(L, B, K, S, E, shared, dtype, seed):
    """Random (expert, naive) caches [L, B, K, S, E] whose row b holds the same first `shared[b]`
    slots on both sides, as the engine's insert leaves a shared prefix."""
    rng = np.random.default_rng(seed)
    caches = rng.standard_normal((2, 2, L, B, K, S, E)).astype(np.float32)  # (k, v) x (expert, naive)
    for b, n in enumerate(shared):
        caches[:, 1, :, b, :, :n] = caches[:, 0, :, b, :, :n]
    return caches


def _as_caches(caches, dtype):
    from mixsd_jax.models.matmul import to_words

    side = lambda c: to_words(jnp.asarray(c, dtype)) if dtype == jnp.bfloat16 else jnp.asarray(c)  # noqa: E731
    return tuple(side(c) for c in caches[0]), tuple(side(c) for c in caches[1])


@pytest.mark.parametrize("model, dtype, atol", [("qwen2", jnp.bfloat16, 3e-2), ("gemma3", jnp.float32, 2e-5)])
def test_naive_rows_read_their_shared_prefix_from_the_expert_cache(tiny_qwen2_dir, tiny_gemma3_dir, model, dtype,
                                                                    atol):
    """MixSD's sides share their prompts' first tokens, prefilled once into both caches: with
    `shared_B` the naive rows read those slots in the expert cache's read. The attention is the one
    read of both caches' (bf16: to round-off; f32 with Gemma 3's sliding windows: to f32 round-off),
    and the naive cache's shared slots are never read."""
    cfg, params = load_hf(tiny_qwen2_dir if model == "qwen2" else tiny_gemma3_dir, jnp.dtype(dtype).name)
    L, K, E, S, block = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 48, 8
    lengths = jnp.asarray([40, 26, 37, 21, 45, 30], jnp.int32)  # (expert, naive) x 3 records
    write = jnp.asarray([40, 26, 37, 21, S, S], jnp.int32)  # the last record is not decoding
    shared = [19, 9, 21]  # the expert read covers them; the naive reads start past them
    caches = _shared_prefix_caches(L, 3, K, S, E, shared, dtype, seed=2)

    def step(caches, shared_B):
        hidden, _, _ = decode_step(params, cfg, jnp.arange(6, dtype=jnp.int32) + 5, lengths, write,
                                   *_as_caches(caches, dtype), jnp.asarray([40, 26], jnp.int32), dtype=dtype,
                                   block=block, activation_dtype=jnp.float32, bf16_as_bits=dtype == jnp.bfloat16,
                                   one_read=True, shared_B=None if shared_B is None else jnp.asarray(shared_B))
        return np.asarray(hidden)

    one_read, shared_read = step(caches, None), step(caches, shared)
    np.testing.assert_allclose(shared_read[:4], one_read[:4], rtol=0, atol=atol)
    # NaN in the naive cache's shared slots: finite equal outputs show they were never read.
    poisoned = caches.copy()
    for b, n in enumerate(shared):
        poisoned[1, 1, :, b, :, :n] = np.nan
    np.testing.assert_array_equal(step(poisoned, shared), shared_read)
    # The check can fail: the naive rows' one read of their own cache reads them.
    assert np.isnan(step(poisoned, None)[1:4:2]).all()

"""One decode step over a shared cache: each side of a record reads only the blocks below its own bound."""

import jax.numpy as jnp
import numpy as np

from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.decode import decode_step


def _step(params, cfg, cache_k, cache_v, lengths, bounds, block):
    """One step of rows (expert, naive, expert, naive, ...) over per-side caches [sides, L, B, K, S, E]."""
    R = len(lengths)
    lengths = jnp.asarray(lengths, jnp.int32)
    hidden, _, _ = decode_step(params, cfg, jnp.arange(R, dtype=jnp.int32) + 5, lengths, lengths,
                               tuple(jnp.asarray(c) for c in cache_k), tuple(jnp.asarray(c) for c in cache_v),
                               jnp.asarray(bounds, jnp.int32), dtype=jnp.float32, block=block)
    return np.asarray(hidden)


def test_naive_rows_never_read_the_blocks_only_expert_rows_reach(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    L, K, E, S, block = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 32, 8
    # Two records, rows (expert, naive) each: the expert rows hold 20 and 17 tokens, the naive rows 6 and 3.
    lengths = [20, 6, 17, 3]
    rng = np.random.default_rng(0)
    cache_k = rng.standard_normal((2, L, 2, K, S, E)).astype(np.float32)
    cache_v = rng.standard_normal((2, L, 2, K, S, E)).astype(np.float32)
    clean = _step(params, cfg, cache_k, cache_v, lengths, [20, 6], block)
    # NaN values in the naive rows' blocks past their bound (slots 8+): reading them would poison the
    # result (a masked score's zero weight times NaN is NaN), so finite equal outputs show they were never read.
    cache_v[1, :, :, :, block:] = np.nan
    poisoned = _step(params, cfg, cache_k, cache_v, lengths, [20, 6], block)
    np.testing.assert_array_equal(poisoned, clean)
    # The check can fail: with one bound for both sides the naive rows walk those blocks.
    shared = _step(params, cfg, cache_k, cache_v, lengths, [20, 20], block)
    assert np.isnan(shared[1::2]).all() and np.array_equal(shared[0::2], clean[0::2])

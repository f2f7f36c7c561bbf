"""The engine's settings, cache-capacity rule and compiled pieces, used directly (as a compile plan does)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.sampling import segments
from mixsd_jax.sampling.engine import Engine, decode_all
from mixsd_jax.sampling.segments import EngineSpec, capacity_for
from mixsd_jax.sampling.strategies import Sampler
from mixsd_jax.sampling.work import MAX_NEW_TOKENS, WorkItem


def _spec(cfg, **kw):
    return EngineSpec(cfg, Sampler(0.6, 16), **{"sides": 2, "max_new_tokens": 12, "max_model_len": 64, "batch_size": 4,
                                                "block": 8, "segment_steps": 4, **kw})


def test_traced_settings_share_one_compiled_segment(tiny_llama_dir):
    """λ, the seed, the stop ids and the batch size are not part of the compiled program's key."""
    cfg, params = load_hf(tiny_llama_dir)
    a, b = _spec(cfg, naive_prob=0.0, seed=1, stop_ids=[9, 3, 9]), _spec(cfg, naive_prob=1.0, seed=2, batch_size=3)
    assert a == b and hash(a) == hash(b) and a.stop_ids == (3, 9)
    assert _spec(cfg, max_new_tokens=13) != a and _spec(cfg, sides=1) != a
    items = [WorkItem(((5, 6, 7), (8, 9)), 0)]
    outs = [decode_all(Engine(params, _spec(cfg, naive_prob=lam)), items)[0] for lam in (0.0, 1.0)]
    compiled = segments.decode_segment._cache_size()
    decode_all(Engine(params, _spec(cfg, naive_prob=0.5, seed=4)), items)
    assert segments.decode_segment._cache_size() == compiled
    assert not any(outs[0].naive) and all(outs[1].naive)  # the λ each engine was given, not the first one's


def test_spec_rejects_bad_settings(tiny_llama_dir):
    cfg, _ = load_hf(tiny_llama_dir)
    with pytest.raises(MixsdError, match="sides"):
        _spec(cfg, sides=3)
    with pytest.raises(MixsdError, match="batch_size"):
        _spec(cfg, batch_size=0)


def test_capacity_is_pow2_blocks_up_to_what_a_row_can_use(tiny_llama_dir):
    cfg, _ = load_hf(tiny_llama_dir)
    spec = _spec(cfg, max_new_tokens=100, max_model_len=1000)  # block 8, segment 4
    assert capacity_for(spec, 20, 5) == 32  # 3 blocks -> 4
    assert capacity_for(spec, 33, 5) == 64  # 5 blocks -> 8
    # A row holds at most prompt + max_new_tokens (+ one segment): 5 + 100 + 4 + 1 = 110 -> 14 blocks.
    assert capacity_for(spec, 100, 5) == 14 * 8
    # Never fewer slots than needed.
    tight = _spec(cfg, max_new_tokens=3, max_model_len=1000)  # ceiling 2 + 3 + 5 = 10 -> 2 blocks
    assert capacity_for(tight, 20, 2) == 24


def test_state_is_a_pytree_and_empty_slots_stay_done(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    spec = _spec(cfg, sides=1, max_new_tokens=6, segment_steps=16)
    state = segments.init_state(spec=spec, batch=4, capacity=16)
    assert len(jax.tree.leaves(state)) == len(dataclasses.fields(segments.DecodeState))
    assert state.done_B.all()
    tokens, lens = jnp.array([[5, 6, 7, 8]], jnp.int32), jnp.array([4], jnp.int32)
    k, v, last = segments.prefill(params, tokens, lens, spec=spec)
    state = segments.insert(state, ((k, v, last, lens),), jnp.array([1], jnp.int32), jnp.zeros((1, 3), jnp.uint32),
                            jnp.int32(0), spec=spec)
    assert state.done_B.tolist() == [True, False, True, True] and state.lengths_R.tolist() == [0, 4, 0, 0]
    grown = segments.grow(state, spec=spec, capacity=32)
    np.testing.assert_array_equal(grown.cache_k[0][:, :, :, :16], state.cache_k[0])
    state, out = segments.decode_segment(params, grown, jnp.float32(0), jnp.array([-1], jnp.int32), jnp.int32(5),
                                         spec=spec)
    # The segment ends when the one live slot stops (6 tokens), not after 16 steps; empty slots emit nothing.
    assert out.step_B.tolist() == [0, 6, 0, 0] and out.finish_B[1] == MAX_NEW_TOKENS
    assert not np.asarray(out.tokens_BxK)[[0, 2, 3]].any() and not np.asarray(out.tokens_BxK)[1, 6:].any()


def test_the_tpu_prompt_write_one_layer_at_a_time_equals_the_whole_scatter():
    """Inserting prompts' keys one layer at a time (TPU) writes what the single scatter (CPU) does,
    slots past the cache dropped."""
    from mixsd_jax.sampling.segments import _write_rows_per_layer, _write_rows_whole

    L, B, K, S, E, N, P = 2, 4, 2, 8, 3, 2, 5
    cache = jax.random.normal(jax.random.key(0), (L, B, K, S, E))
    new = jax.random.normal(jax.random.key(1), (L, N, P, K, E))
    slots_N, starts_N = jnp.array([3, 0]), jnp.array([0, 6])  # the second row runs past the cache
    whole = _write_rows_whole(cache, slots_N, starts_N, new)
    np.testing.assert_array_equal(np.asarray(jax.jit(_write_rows_per_layer)(cache, slots_N, starts_N, new)),
                                  np.asarray(whole))
    np.testing.assert_array_equal(np.asarray(whole[:, 3, :, :P]), np.asarray(jnp.moveaxis(new[:, 0], 1, 2)))
    np.testing.assert_array_equal(np.asarray(whole[:, 0, :, 6:]), np.asarray(jnp.moveaxis(new[:, 1, :2], 1, 2)))


def test_default_block_on_a_cpu_follows_the_dtype(tiny_llama_dir):
    """f32 walks 128-slot blocks (its pinned outputs); bf16, whose blocks XLA:CPU copies out of the
    cache, reads its live 16-slot blocks at once; an explicit block is kept."""
    cfg, _ = load_hf(tiny_llama_dir)
    spec = functools.partial(EngineSpec, cfg, Sampler(0.0), sides=2, max_new_tokens=8, max_model_len=64, batch_size=4)
    assert spec().block == 128 and spec(dtype="bfloat16").block == 16
    assert spec(dtype="bfloat16").one_read_attention and not spec().one_read_attention
    assert spec(dtype="bfloat16", block=32).block == 32

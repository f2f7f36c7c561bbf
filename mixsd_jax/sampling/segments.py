"""The decode engine's compiled pieces: prefill, insert into slots, decode a segment of K steps, grow.

Device state (a dict) for B slots and R = B * sides rows (row b * sides + side; side 0 = expert or
the only prompt, side 1 = naive):
  cache_k, cache_v [L, R, S, K, E]  row r's tokens in slots [0, lengths_R[r]), position = slot
  lengths_R [R]                     tokens in each row's cache
  last_RxD [R, D]                   final-norm hidden of each row's last token (the next logits' input)
  keys_Bx2 [B, 2] uint32            the attempt's key (raw key data, so it can live in a plain array)
  step_B, done_B, finish_B          tokens generated, stopped, FINISH_NAMES code
  longest_B                         the record's longest prompt (the max_model_len rule counts it)

The per-step rule is the fixed-batch kernel's (kernel.py): step t of an attempt draws from
fold_in(attempt key, t) — split into the side pick (0) and the token draw (1) — and picks the naive
row with probability λ; the LM head runs on the chosen row only; the token extends every row of the
record. Slot numbers and neighbours never enter a row's arithmetic, so an attempt's tokens are the
same whichever slot and segment it runs in.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixsd_jax.models import transformer as tf
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.decode import decode_step
from mixsd_jax.models.sharding import BATCH_AXES, fit_spec
from mixsd_jax.sampling.kernel import EXPERT, MAX_MODEL_LEN, MAX_NEW_TOKENS, NAIVE, RUNNING, STOP
from mixsd_jax.sampling.strategies import Sampler


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Static (hashable) settings: one compiled program per spec and shape."""

    cfg: ModelConfig
    sampler: Sampler
    sides: int  # 1: plain decoding; 2: expert + naive mixing
    max_new_tokens: int
    max_model_len: int
    dtype: str = "float32"
    mesh: Mesh | None = None
    segment_steps: int = 16  # decode steps between host refills
    block: int = 128  # cache slots per attention block


# Layout of each state entry: the row/slot axis over the batch axes, the cache's kv heads over `tensor`.
_LAYOUT = {
    "cache_k": P(None, BATCH_AXES, None, "tensor", None),
    "cache_v": P(None, BATCH_AXES, None, "tensor", None),
    "lengths_R": P(BATCH_AXES),
    "last_RxD": P(BATCH_AXES, None),
    "keys_Bx2": P(BATCH_AXES, None),
    "step_B": P(BATCH_AXES),
    "done_B": P(BATCH_AXES),
    "finish_B": P(BATCH_AXES),
    "longest_B": P(BATCH_AXES),
}


def _constrain(state: dict, spec: EngineSpec) -> dict:
    if spec.mesh is None:
        return state
    return {
        name: jax.lax.with_sharding_constraint(x, NamedSharding(spec.mesh, fit_spec(_LAYOUT[name], x.shape, spec.mesh)))
        for name, x in state.items()
    }


@functools.partial(jax.jit, static_argnames=("spec", "batch", "capacity"))
def init_state(*, spec: EngineSpec, batch: int, capacity: int) -> dict:
    """Every slot empty (done), caches of `capacity` slots."""
    cfg, R, dtype = spec.cfg, batch * spec.sides, jnp.dtype(spec.dtype)
    shape = (cfg.num_layers, R, capacity, cfg.num_kv_heads, cfg.head_dim)
    return _constrain({
        "cache_k": jnp.zeros(shape, dtype),
        "cache_v": jnp.zeros(shape, dtype),
        "lengths_R": jnp.zeros((R,), jnp.int32),
        "last_RxD": jnp.zeros((R, cfg.hidden_size), dtype),
        "keys_Bx2": jnp.zeros((batch, 2), jnp.uint32),
        "step_B": jnp.zeros((batch,), jnp.int32),
        "done_B": jnp.ones((batch,), bool),
        "finish_B": jnp.zeros((batch,), jnp.int32),
        "longest_B": jnp.zeros((batch,), jnp.int32),
    }, spec)


@functools.partial(jax.jit, static_argnames=("spec", "capacity"))  # a bigger buffer: nothing to donate
def grow(state: dict, *, spec: EngineSpec, capacity: int) -> dict:
    """The same state with caches of `capacity` slots (the live slots copied, the new ones zero)."""
    extra = capacity - state["cache_k"].shape[2]
    pad = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
    return _constrain({**state, "cache_k": jnp.pad(state["cache_k"], pad), "cache_v": jnp.pad(state["cache_v"], pad)},
                      spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def prefill(params, tokens_NxP, lens_N, *, spec: EngineSpec):
    """Keys, values [L, N, P, K, E] and last hidden [N, D] of right-padded prompts."""
    seg_NxP = (jnp.arange(tokens_NxP.shape[1])[None, :] < lens_N[:, None]).astype(jnp.int32)
    hidden_NxPxD, cache = tf.prefill(params, spec.cfg, tokens_NxP, tf.padded_positions(seg_NxP), seg_NxP,
                                     tokens_NxP.shape[1], dtype=jnp.dtype(spec.dtype))
    last_NxD = jnp.take_along_axis(hidden_NxPxD, (lens_N - 1)[:, None, None], axis=1)[:, 0]
    return cache["k"], cache["v"], last_NxD


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=0)
def insert(state: dict, sides: tuple, slots_N, ids_Nx3, seed, *, spec: EngineSpec) -> dict:
    """Write prefilled prompts into slots `slots_N` (an entry >= B is padding: dropped) and reset them.

    `sides` holds one (k, v, last, lens) per side, written straight into the rows of the long-lived
    cache: no per-batch cache is built and no sides are stacked. `ids_Nx3` = (record, generation,
    attempt); the attempt key is fold_in(key(seed), record, generation, attempt), as kernel.record_keys.
    """
    state = dict(state)
    for side, (k_LxNxPxKxE, v_LxNxPxKxE, last_NxD, lens_N) in enumerate(sides):
        rows_N = slots_N * spec.sides + side
        cols_P = jnp.arange(k_LxNxPxKxE.shape[2])
        for name, new in (("cache_k", k_LxNxPxKxE), ("cache_v", v_LxNxPxKxE)):
            state[name] = state[name].at[:, rows_N[:, None], cols_P[None, :]].set(new.astype(state[name].dtype),
                                                                                  mode="drop")
        state["lengths_R"] = state["lengths_R"].at[rows_N].set(lens_N, mode="drop")
        state["last_RxD"] = state["last_RxD"].at[rows_N].set(last_NxD.astype(state["last_RxD"].dtype), mode="drop")

    def key_of(ids):
        key = jax.random.key(seed)
        for i in range(3):
            key = jax.random.fold_in(key, ids[i])
        return jax.random.key_data(key)

    longest_N = jnp.max(jnp.stack([lens for *_, lens in sides]), axis=0)
    state["keys_Bx2"] = state["keys_Bx2"].at[slots_N].set(jax.vmap(key_of)(ids_Nx3), mode="drop")
    state["step_B"] = state["step_B"].at[slots_N].set(0, mode="drop")
    state["done_B"] = state["done_B"].at[slots_N].set(False, mode="drop")
    state["finish_B"] = state["finish_B"].at[slots_N].set(RUNNING, mode="drop")
    state["longest_B"] = state["longest_B"].at[slots_N].set(longest_N, mode="drop")
    return _constrain(state, spec)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=1)
def decode_segment(params, state: dict, naive_prob, stop_ids, refill_at, *, spec: EngineSpec):
    """Up to `segment_steps` decode steps: fewer when every slot has stopped, or once `refill_at`
    slots have stopped in this segment (the host has work waiting for them; pass B + 1 for never).

    Returns (state, out): out["tokens"|"logprobs"|"naive"] [B, K] hold each slot's tokens of this
    segment in columns [0, its step count here) — a slot runs from the segment's start until it
    stops — and out["step_B"|"done_B"|"finish_B"] are copies the host reads while the state is
    donated to the next segment.
    """
    cfg, sides, N, K = spec.cfg, spec.sides, spec.max_new_tokens, spec.segment_steps
    dtype = jnp.dtype(spec.dtype)
    B = state["step_B"].shape[0]
    S = state["cache_k"].shape[2]
    fold = jax.vmap(jax.random.fold_in)

    def body(carry):
        k, st, out, freed = carry
        keys_B = jax.random.wrap_key_data(st["keys_Bx2"])
        step_keys = fold(keys_B, st["step_B"])
        pick_keys = fold(step_keys, jnp.zeros((B,), jnp.int32))
        draw_keys = fold(step_keys, jnp.ones((B,), jnp.int32))
        last_BxSxD = st["last_RxD"].reshape(B, sides, -1)
        if sides == 1:
            naive_B = jnp.zeros((B,), bool)
            chosen_BxD = last_BxSxD[:, 0]
        else:
            naive_B = jax.vmap(jax.random.uniform)(pick_keys) < naive_prob
            chosen_BxD = jnp.where(naive_B[:, None], last_BxSxD[:, NAIVE], last_BxSxD[:, EXPERT])
        logits_BxV = tf.lm_logits(params, cfg, chosen_BxD, dtype=dtype)
        token_B, logprob_B = spec.sampler.next_tokens(logits_BxV, draw_keys)

        active_B = ~st["done_B"]
        n_B = st["step_B"] + 1
        finish_now_B = jnp.where(
            jnp.isin(token_B, stop_ids),
            STOP,
            jnp.where(n_B >= N, MAX_NEW_TOKENS,
                      jnp.where(st["longest_B"] + n_B + 1 > spec.max_model_len, MAX_MODEL_LEN, RUNNING)),
        )
        out = {
            "tokens": out["tokens"].at[:, k].set(jnp.where(active_B, token_B, 0)),
            "logprobs": out["logprobs"].at[:, k].set(jnp.where(active_B, logprob_B, 0.0)),
            "naive": out["naive"].at[:, k].set(active_B & naive_B),
        }
        stopping_B = active_B & (finish_now_B != RUNNING)
        done_B = st["done_B"] | stopping_B
        running_R = jnp.repeat(~done_B, sides)
        lengths_R = st["lengths_R"]
        # Only records still running feed their token; a stopped row's write is dropped (index S).
        hidden_RxD, cache_k, cache_v = decode_step(
            params, cfg, jnp.repeat(token_B, sides), lengths_R, jnp.where(running_R, lengths_R, S),
            st["cache_k"], st["cache_v"], jnp.max(jnp.where(running_R, lengths_R, 0).reshape(B, sides), axis=0),
            dtype=dtype, block=spec.block,
        )
        st = {
            **st,
            "cache_k": cache_k,
            "cache_v": cache_v,
            "lengths_R": jnp.where(running_R, lengths_R + 1, lengths_R),
            "last_RxD": hidden_RxD.astype(st["last_RxD"].dtype),
            "step_B": jnp.where(active_B, n_B, st["step_B"]),
            "done_B": done_B,
            "finish_B": jnp.where(stopping_B, finish_now_B, st["finish_B"]),
        }
        return k + 1, st, out, freed + jnp.sum(stopping_B, dtype=jnp.int32)

    def cond(carry):
        k, st, _, freed = carry
        return (k < K) & ~jnp.all(st["done_B"]) & (freed < refill_at)

    out = {
        "tokens": jnp.zeros((B, K), jnp.int32),
        "logprobs": jnp.zeros((B, K), jnp.float32),
        "naive": jnp.zeros((B, K), bool),
    }
    zero = jnp.zeros((), jnp.int32)
    _, state, out, _ = jax.lax.while_loop(cond, body, (zero, state, out, zero))
    out.update(step_B=state["step_B"] + 0, done_B=state["done_B"] | False, finish_B=state["finish_B"] + 0)
    return _constrain(state, spec), out

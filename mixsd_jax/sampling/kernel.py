"""The fixed-batch decode loop, for one conditional (plain generation) or two (the MixSD mix).

Generation and evaluation run on the continuous-batching engine (segments.py, engine.py), which
keeps this file's per-step rule; this loop remains as the reference it is tested against.

Rows are grouped per record: row `b * sides + side`, side 0 = expert (or the only prompt), side 1 =
naive. Both rows of a record share one generated suffix: every step draws, per record,
Bernoulli(λ) to pick the naive side (λ = probability of a naive token), runs the LM head on the
chosen row only, samples one token and appends it to *both* rows at their own positions, so both KV
caches stay live and nothing is ever re-prefilled. Prefill and the whole loop are one `jax.jit`;
the loop is a `lax.while_loop` that ends when every record has stopped.

Randomness: record r's step t uses `fold_in(record_key[r], t)`, split into the side pick (0) and the
token draw (1). The record key is derived on the host from (seed, record index, generation index,
attempt), so a record's output does not depend on which batch, slot or device it ran in.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixsd_jax.models import transformer as tf
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.sharding import BATCH_AXES
from mixsd_jax.sampling.strategies import Sampler

RUNNING, STOP, MAX_NEW_TOKENS, MAX_MODEL_LEN = 0, 1, 2, 3
FINISH_NAMES = {STOP: "stop", MAX_NEW_TOKENS: "max_new_tokens", MAX_MODEL_LEN: "max_model_len"}
EXPERT, NAIVE = 0, 1


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Static (hashable) settings: one compiled kernel per spec and input shape."""

    cfg: ModelConfig
    sampler: Sampler
    sides: int  # 1: plain decoding; 2: expert + naive mixing
    max_new_tokens: int
    max_model_len: int
    dtype: str = "float32"
    mesh: Mesh | None = None


def _constrain(x, spec: KernelSpec, batch_dim: int = 0, kv_dim: int | None = None):
    if spec.mesh is None:
        return x
    parts = [None] * x.ndim
    parts[batch_dim] = BATCH_AXES
    if kv_dim is not None and x.shape[kv_dim] % spec.mesh.shape["tensor"] == 0:
        parts[kv_dim] = "tensor"  # tensor-parallel decode: each device keeps the KV heads its wk/wv shard makes
    return jax.lax.with_sharding_constraint(x, NamedSharding(spec.mesh, P(*parts)))


@functools.partial(jax.jit, static_argnames=("spec",))
def decode(params, prompts, record_keys_B, live_B, naive_prob, stop_ids, *, spec: KernelSpec):
    """Generate up to `max_new_tokens` per record.

    `prompts` holds one (tokens [B, P_side], lengths [B]) pair per side (expert first), each
    right-padded to its own width, so short naive prompts are not prefilled at the expert's width.
    `live_B` is False for the slots that only pad the batch: they start finished, so the loop ends
    when the real records do.
    Returns dict of: tokens [B, N] (0 after the end), logprobs [B, N] (model log-prob of each token
    under the conditional that produced it), naive [B, N] (True where the naive side was picked),
    lengths [B] (tokens generated, stop token included), finish [B] (FINISH_NAMES codes).
    """
    cfg, sides, N = spec.cfg, spec.sides, spec.max_new_tokens
    dtype = jnp.dtype(spec.dtype)
    B = record_keys_B.shape[0]
    R = B * sides
    P = max(tokens.shape[1] for tokens, _ in prompts)

    # Prefill each side into slots [0, P_side) of a cache of P + N slots; decoded tokens go to P, P+1...
    lasts, caches = [], []
    for tokens_BxP, lens_B in prompts:
        seg_BxP = (jnp.arange(tokens_BxP.shape[1])[None, :] < lens_B[:, None]).astype(jnp.int32)
        hidden_BxPxD, cache = tf.prefill(params, cfg, tokens_BxP, tf.padded_positions(seg_BxP), seg_BxP, P + N,
                                         dtype=dtype)
        lasts.append(jnp.take_along_axis(hidden_BxPxD, (lens_B - 1)[:, None, None], axis=1)[:, 0])
        caches.append(cache)

    def rows(arrays, axis):  # [B, ...] per side -> [R, ...], row b * sides + side
        stacked = jnp.stack(arrays, axis=axis + 1)
        return stacked.reshape(*stacked.shape[:axis], R, *stacked.shape[axis + 2 :])

    cache = {
        "k": _constrain(rows([c["k"] for c in caches], 1), spec, 1, kv_dim=3),  # [L, R, S, KV, Dh]
        "v": _constrain(rows([c["v"] for c in caches], 1), spec, 1, kv_dim=3),
        "valid": _constrain(rows([c["valid"] for c in caches], 0), spec),
        "end": jnp.asarray(P, jnp.int32),
    }
    last_RxD = rows(lasts, 0)
    prompt_lens_R = rows([lens for _, lens in prompts], 0)
    longest_prompt_B = prompt_lens_R.reshape(B, sides).max(axis=1)

    def body(state):
        t, cache, last_RxD, out, done_B = state
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(record_keys_B, t)
        pick_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(step_keys, 0)
        draw_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(step_keys, 1)
        last_BxSxD = last_RxD.reshape(B, sides, -1)
        if sides == 1:
            naive_B = jnp.zeros((B,), bool)
            chosen_BxD = last_BxSxD[:, 0]
        else:
            naive_B = jax.vmap(jax.random.uniform)(pick_keys) < naive_prob
            chosen_BxD = jnp.where(naive_B[:, None], last_BxSxD[:, NAIVE], last_BxSxD[:, EXPERT])
        # The LM head runs on one row per record, not on both conditionals.
        logits_BxV = tf.lm_logits(params, cfg, chosen_BxD, dtype=dtype)
        token_B, logprob_B = spec.sampler.next_tokens(logits_BxV, draw_keys)

        active_B = ~done_B
        n = t + 1
        finish_now_B = jnp.where(
            jnp.isin(token_B, stop_ids),
            STOP,
            jnp.where(n >= N, MAX_NEW_TOKENS, jnp.where(longest_prompt_B + n + 1 > spec.max_model_len, MAX_MODEL_LEN, RUNNING)),
        )
        out = {
            "tokens": out["tokens"].at[:, t].set(jnp.where(active_B, token_B, 0)),
            "logprobs": out["logprobs"].at[:, t].set(jnp.where(active_B, logprob_B, 0.0)),
            "naive": out["naive"].at[:, t].set(active_B & naive_B),
            "lengths": jnp.where(active_B, n, out["lengths"]),
            "finish": jnp.where(active_B & (finish_now_B != RUNNING), finish_now_B, out["finish"]),
        }
        done_B = done_B | (finish_now_B != RUNNING)

        # The same token extends every row of the record, each at its own next position.
        token_R = jnp.repeat(token_B, sides)
        positions_R = prompt_lens_R + t
        hidden_Rx1xD, cache = tf.forward(
            params, cfg, token_R[:, None], positions_R[:, None], jnp.ones((R, 1), jnp.int32), cache, dtype=dtype
        )
        return t + 1, cache, hidden_Rx1xD[:, 0], out, done_B

    def cond(state):
        t, _, _, _, done_B = state
        return (t < N) & ~jnp.all(done_B)

    out = {
        "tokens": _constrain(jnp.zeros((B, N), jnp.int32), spec),
        "logprobs": _constrain(jnp.zeros((B, N), jnp.float32), spec),
        "naive": _constrain(jnp.zeros((B, N), bool), spec),
        "lengths": _constrain(jnp.zeros((B,), jnp.int32), spec),
        "finish": _constrain(jnp.zeros((B,), jnp.int32), spec),
    }
    state = (jnp.zeros((), jnp.int32), cache, last_RxD, out, ~live_B)
    _, _, _, out, _ = jax.lax.while_loop(cond, body, state)
    return out


@jax.jit
def record_keys(seed, record_indices, gen_indices, attempts) -> jax.Array:
    """Key of each attempt at a (record, generation): fold_in(seed key, record, generation, attempt)."""

    def one(r, g, a):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), r), g), a)

    return jax.vmap(one)(record_indices, gen_indices, attempts)

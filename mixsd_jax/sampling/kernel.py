"""The compiled decode loop, for one conditional (plain generation) or two (the MixSD mix).

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


def _constrain(x, spec: KernelSpec, batch_dim: int = 0):
    if spec.mesh is None:
        return x
    parts = [None] * x.ndim
    parts[batch_dim] = BATCH_AXES
    return jax.lax.with_sharding_constraint(x, NamedSharding(spec.mesh, P(*parts)))


@functools.partial(jax.jit, static_argnames=("spec",))
def decode(params, prompt_tokens_RxP, prompt_lens_R, record_keys_B, naive_prob, stop_ids, *, spec: KernelSpec):
    """Generate up to `max_new_tokens` per record.

    Returns dict of: tokens [B, N] (0 after the end), logprobs [B, N] (model log-prob of each token
    under the conditional that produced it), naive [B, N] (True where the naive side was picked),
    lengths [B] (tokens generated, stop token included), finish [B] (FINISH_NAMES codes).
    """
    cfg, sides, N = spec.cfg, spec.sides, spec.max_new_tokens
    dtype = jnp.dtype(spec.dtype)
    R, Pmax = prompt_tokens_RxP.shape
    B = R // sides

    # Prefill every row into its own cache slots [0, P); decoded tokens go to slots P, P+1, ...
    seg_RxP = (jnp.arange(Pmax)[None, :] < prompt_lens_R[:, None]).astype(jnp.int32)
    hidden_RxPxD, cache = tf.prefill(params, cfg, prompt_tokens_RxP, tf.padded_positions(seg_RxP), seg_RxP, Pmax + N,
                                     dtype=dtype)
    cache = jax.tree.map(lambda x: _constrain(x, spec) if x.ndim else x, cache)
    last_RxD = jnp.take_along_axis(hidden_RxPxD, (prompt_lens_R - 1)[:, None, None], axis=1)[:, 0]
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
    state = (jnp.zeros((), jnp.int32), cache, last_RxD, out, jnp.zeros((B,), bool))
    _, _, _, out, _ = jax.lax.while_loop(cond, body, state)
    return out


@jax.jit
def record_keys(seed, record_indices, gen_indices, attempts) -> jax.Array:
    """Key of each attempt at a (record, generation): fold_in(seed key, record, generation, attempt)."""

    def one(r, g, a):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), r), g), a)

    return jax.vmap(one)(record_indices, gen_indices, attempts)

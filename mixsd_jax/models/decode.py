"""One decode step for rows that sit at their own cache lengths, reading the cache only up to the live end.

The continuous-batching engine (sampling/engine.py) keeps one long-lived cache whose rows hold
unrelated sequences of different lengths. Row r holds `lengths_R[r]` tokens in slots [0, lengths)
with positions equal to slots, so its next token has position `lengths_R[r]` and goes to that slot.

Attention walks the cache in blocks of `block` slots with an online softmax (running max, sum and
weighted values), and only over the blocks below the longest live row: the work and the KV reads of
a step follow the live length, not the cache capacity. Rows come in groups of `sides` (row
b * sides + side: a MixSD record's expert and naive rows), and each side has its own bound: the
naive rows' shorter prompts do not walk the blocks only the expert prompts reach. The cache is read
from the full [L, R, S, K, E] array block by block (never sliced per layer first, which would copy
a whole layer's cache every step), and the step's new keys and values are scattered in place after
the layer scan.

A masked score is a finite -1e30 and every row first sees its own new token, so a block beyond a
row's length adds exactly zero: a row's result never depends on its neighbours' lengths.

A sliding-window layer (Gemma 3) also starts its walk late: at the block holding the oldest slot
inside the window of the side's shortest decoding row, so it reads at most its window (plus one
block, and the spread of the side's lengths) whatever the context length.

The layer itself is `block.block`, the one training and prefill use; only the attention differs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixsd_jax.models.attention import MASKED
from mixsd_jax.models.block import block as decoder_block, embed, layer_variants, norm, rope_inv_freq
from mixsd_jax.models.config import ModelConfig


def _block_attention(q_RxKxGxE, k_self_RxKxE, v_self_RxKxE, cache_k, cache_v, layer, side, sides, lengths_R, bound,
                     block, divisor, window=None, first=None):
    """softmax(q · [cache[:lengths], self]) · values for the rows of one side (q's R rows are cache
    rows side, side + sides, ...), over the blocks of the cache below `bound`. With a `window`, a
    row sees only the slots fewer than `window` behind its new token, and the walk starts at the
    block of slot `first - window + 1` (`first`: the side's shortest decoding row's length)."""
    R, K, G, E = q_RxKxGxE.shape
    L, _, S = cache_k.shape[:3]
    if sides > 1:  # [L, R * sides, S, K, E] viewed as [L, R, sides, S, K, E]: a reshape of contiguous memory
        cache_k, cache_v = (c.reshape(L, R, sides, S, K, E) for c in (cache_k, cache_v))

    def read(cache, start):
        # With one side the cache is sliced as it is: measured on XLA's CPU backend, the [L, R, 1, S, K, E]
        # view made plain decoding 2x slower.
        if sides == 1:
            return jax.lax.dynamic_slice(cache, (layer, 0, start, 0, 0), (1, R, block, K, E))[0]
        return jax.lax.dynamic_slice(cache, (layer, 0, side, start, 0, 0), (1, R, 1, block, K, E))[0, :, 0]
    scale = 1.0 / divisor
    vdtype = v_self_RxKxE.dtype
    m_RxKxG = jnp.einsum("rkge,rke->rkg", q_RxKxGxE, k_self_RxKxE, preferred_element_type=jnp.float32) * scale
    l_RxKxG = jnp.ones_like(m_RxKxG)
    acc_RxKxGxE = jnp.broadcast_to(v_self_RxKxE[:, :, None, :], (R, K, G, E)).astype(jnp.float32)

    def one_block(i, carry):
        m, l, acc = carry
        start = i * block
        k_RxSxKxE, v_RxSxKxE = read(cache_k, start).astype(vdtype), read(cache_v, start).astype(vdtype)
        s = jnp.einsum("rkge,rske->rkgs", q_RxKxGxE, k_RxSxKxE, preferred_element_type=jnp.float32) * scale
        slots_S = start + jnp.arange(block)
        seen_RxS = slots_S[None, :] < lengths_R[:, None]
        if window is not None:
            seen_RxS = seen_RxS & (slots_S[None, :] > (lengths_R - window)[:, None])
        s = jnp.where(seen_RxS[:, None, None, :], s, MASKED)
        m_new = jnp.maximum(m, s.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "rkgs,rske->rkge", p.astype(vdtype), v_RxSxKxE, preferred_element_type=jnp.float32
        )
        return m_new, l, acc

    n_blocks = (bound + block - 1) // block
    first_block = 0 if window is None else jnp.maximum(first - window + 1, 0) // block
    _, l_RxKxG, acc_RxKxGxE = jax.lax.fori_loop(first_block, n_blocks, one_block, (m_RxKxG, l_RxKxG, acc_RxKxGxE))
    return (acc_RxKxGxE / l_RxKxG[..., None]).astype(vdtype).reshape(R, K * G * E)


def decode_step(params, cfg: ModelConfig, tokens_R, lengths_R, write_R, cache_k, cache_v, bounds, *, dtype, block):
    """Feed one token per row; returns (final-norm hidden [R, D], cache_k, cache_v).

    `write_R` is the slot each row's new key/value goes to (a row that is not decoding passes the
    capacity S: the write is dropped). `bounds` [sides]: no row of side s (rows s, s + sides, ...)
    reads a slot at or past bounds[s].
    """
    R, sides = tokens_R.shape[0], bounds.shape[0]
    L, K, E, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    S = cache_k.shape[2]
    variants = layer_variants(cfg)
    inv_freq = rope_inv_freq(cfg)
    positions_Rx1 = lengths_R[:, None]
    by_side = lambda x: x.reshape(R // sides, sides, *x.shape[1:])  # noqa: E731 - rows -> [B, sides, ...]
    lengths_BxS = by_side(lengths_R)
    # The shortest decoding row of each side: where a sliding window's walk over the cache starts.
    firsts = jnp.min(jnp.where(by_side(write_R) < S, lengths_BxS, S), axis=0)

    def attend(layer, window, q_Rx1xHxE, k_Rx1xKxE, v_Rx1xKxE):
        # Through the cache dtype first, so this step sees its own key exactly as later steps will.
        k_RxKxE = k_Rx1xKxE[:, 0].astype(cache_k.dtype).astype(dtype)
        v_RxKxE = v_Rx1xKxE[:, 0].astype(cache_v.dtype).astype(dtype)
        q_BxSxKxGxE = by_side(q_Rx1xHxE[:, 0].reshape(R, K, H // K, E))
        k_BxSxKxE, v_BxSxKxE = by_side(k_RxKxE), by_side(v_RxKxE)
        attn = jnp.stack([
            _block_attention(q_BxSxKxGxE[:, s], k_BxSxKxE[:, s], v_BxSxKxE[:, s], cache_k, cache_v, layer, s, sides,
                             lengths_BxS[:, s], bounds[s], block, cfg.attention_divisor, window, firsts[s])
            for s in range(sides)
        ], axis=1).reshape(R, 1, -1)
        return attn, (k_RxKxE, v_RxKxE)

    def layer_body(x_Rx1xD, inputs):
        p, layer, variant = inputs
        window = None if variant is None else variant["window"]
        x_Rx1xD, kv, _ = decoder_block(p, cfg, x_Rx1xD, positions_Rx1,
                                       inv_freq if variant is None else variant["inv_freq"],
                                       functools.partial(attend, layer, window), dtype=dtype)
        return x_Rx1xD, kv

    x_Rx1xD = embed(params, cfg, tokens_R[:, None], dtype)
    x_Rx1xD, (k_LxRxKxE, v_LxRxKxE) = jax.lax.scan(layer_body, x_Rx1xD, (params["layers"], jnp.arange(L), variants))
    rows = jnp.arange(R)
    cache_k = cache_k.at[:, rows, write_R].set(k_LxRxKxE.astype(cache_k.dtype), mode="drop")
    cache_v = cache_v.at[:, rows, write_R].set(v_LxRxKxE.astype(cache_v.dtype), mode="drop")
    return norm(x_Rx1xD[:, 0], params["final_norm"], cfg), cache_k, cache_v

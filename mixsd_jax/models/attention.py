"""The attention functions a decoder block is given: dense, blockwise (long training rows) and
cached (new tokens against a KV cache). Each takes q [B, T, H, E] and keys/values [B, S, K, E]
(K kv heads shared by G = H/K query heads) and returns [B, T, H*E]; the decode engine's live-length
attention is in decode.py.

Masks are boolean, True = may attend. A masked score is a finite -1e30, so a fully masked (pad)
query row yields a finite softmax (the mean of the values), not NaN. `divisor` is the model's
attention divisor (sqrt(head_dim), or sqrt(query_pre_attn_scalar) for Gemma 3). `window` (a traced
scalar, or None for models without sliding layers) keeps only keys fewer than `window` positions
behind the query: a sliding-window layer passes its window, a full layer a number past any length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mixsd_jax.models.matmul import batch_matmul

MASKED = -1e30
NO_WINDOW = 2**30  # the window of a full-attention layer in a model that also has sliding ones


def sequence_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """[B, T, T]: causal, same segment, real tokens (segment != 0) only."""
    idx = jnp.arange(segment_ids_BxT.shape[1])
    return (
        (idx[:, None] >= idx[None, :])[None]
        & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
        & (segment_ids_BxT != 0)[:, :, None]
    )


def within_window(positions_q_BxT: jax.Array, positions_k_BxS: jax.Array, window) -> jax.Array:
    """[B, T, S]: key fewer than `window` positions behind the query."""
    return (positions_q_BxT[:, :, None] - positions_k_BxS[:, None, :]) < window


def attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS, divisor: float | None = None,
              matmul_dtype=None) -> jax.Array:
    """With `matmul_dtype`, both matmuls take operands in that dtype (the softmax stays f32) and
    the output keeps q's dtype: `low_precision_attention`."""
    if matmul_dtype is not None:
        return low_precision_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS, divisor, matmul_dtype)
    B, T, H, E = q_BxTxHxE.shape
    K = k_BxSxKxE.shape[2]
    q_BxTxKxGxE = q_BxTxHxE.reshape(B, T, K, H // K, E)
    scores = jnp.einsum("btkge,bske->bkgts", q_BxTxKxGxE, k_BxSxKxE, preferred_element_type=jnp.float32)
    scores = scores / (divisor or math.sqrt(E))
    scores = jnp.where(mask_BxTxS[:, None, None, :, :], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxE.dtype)
    out = jnp.einsum("bkgts,bske->btkge", probs, v_BxSxKxE)
    return out.reshape(B, T, H * E)


def low_precision_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS, divisor, dtype) -> jax.Array:
    """`attention` with its two matmuls in `dtype` (bf16 on a CPU with bf16 matmul units) around
    f32 activations, as PyTorch's autocast runs it. Heads are moved next to the batch first so
    QK^T and PV are batched matmuls over B*K, each [G*T, E] x [S, E] and [G*T, S] x [S, E] with
    its batch axis leading: the form XLA:CPU's fast library path takes, forward and backward
    (models.matmul.batch_matmul). The einsums of `attention` put the batch axes mid-array, and
    XLA runs them (and their gradients) on its generic f32 matmul instead."""
    B, T, H, E = q_BxTxHxE.shape
    S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
    G = H // K
    q_BKxGTxE = jnp.transpose(q_BxTxHxE.astype(dtype).reshape(B, T, K, G, E), (0, 2, 3, 1, 4)).reshape(B * K, G * T, E)
    k_BKxSxE, v_BKxSxE = (jnp.transpose(a.astype(dtype), (0, 2, 1, 3)).reshape(B * K, S, E)
                          for a in (k_BxSxKxE, v_BxSxKxE))
    scores = batch_matmul(q_BKxGTxE, k_BKxSxE, dtype, jnp.float32, b_nk=True).reshape(B, K, G, T, S)
    scores = scores / (divisor or math.sqrt(E))
    scores = jnp.where(mask_BxTxS[:, None, None, :, :], scores, MASKED)
    probs_BKxGTxS = jax.nn.softmax(scores, axis=-1).reshape(B * K, G * T, S)
    out = batch_matmul(probs_BKxGTxS, v_BKxSxE, dtype, q_BxTxHxE.dtype).reshape(B, K, G, T, E)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, H * E)


def blockwise_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT, block: int, divisor: float | None = None,
                        window=None) -> jax.Array:
    """`attention` over the sequence itself (causal, same segment, real tokens), computed block by
    block with an online softmax (FlashAttention's recurrence), so no [T, T] scores exist: the
    largest buffer is one [block, block] tile of scores per head. Both loops are rematerialised, so
    the backward pass keeps one running (max, sum, output) per query block and key block instead of
    the probabilities. Equal to `attention` to round-off, pad rows included (a fully masked row
    averages every value in both). Within a segment positions advance with the index, so the
    window is measured in indices."""
    B, T, H, E = q_BxTxHxE.shape
    K = k_BxTxKxE.shape[2]
    G = H // K
    pad = -T % block
    idx_T = jnp.arange(T + pad)
    if pad:  # padded keys and queries are segment 0: masked out, then cut off
        q_BxTxHxE, k_BxTxKxE, v_BxTxKxE = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
                                           for a in (q_BxTxHxE, k_BxTxKxE, v_BxTxKxE))
        segment_ids_BxT = jnp.pad(segment_ids_BxT, ((0, 0), (0, pad)))
    n = (T + pad) // block

    def blocks(a):  # [B, n*C, ...] -> [n, B, C, ...]
        return jnp.moveaxis(a.reshape(B, n, block, *a.shape[2:]), 1, 0)

    q_blocks = blocks(q_BxTxHxE.reshape(B, T + pad, K, G, E))
    kv_blocks = (blocks(k_BxTxKxE), blocks(v_BxTxKxE), blocks(segment_ids_BxT), idx_T.reshape(n, block))
    scale = 1.0 / (divisor or math.sqrt(E))

    def query_block(_, xs):
        q_BxCxKxGxE, seg_q_BxC, idx_q_C = xs

        def key_block(carry, ys):
            m_BxKxGxC, l_BxKxGxC, acc_BxKxGxCxE = carry
            k_BxCxKxE, v_BxCxKxE, seg_k_BxC, idx_k_C = ys
            s = jnp.einsum("bqkge,bske->bkgqs", q_BxCxKxGxE, k_BxCxKxE, preferred_element_type=jnp.float32) * scale
            mask_BxCxC = (
                (idx_q_C[:, None] >= idx_k_C[None, :])[None]
                & (seg_q_BxC[:, :, None] == seg_k_BxC[:, None, :])
                & (seg_q_BxC != 0)[:, :, None]
            )
            if window is not None:
                mask_BxCxC = mask_BxCxC & ((idx_q_C[:, None] - idx_k_C[None, :]) < window)[None]
            # Keys past T (block padding) rank below masked ones, so a fully masked query averages
            # the T real values, as in `attention`.
            masked_C = jnp.where(idx_k_C < T, MASKED, 3 * MASKED)
            s = jnp.where(mask_BxCxC[:, None, None], s, masked_C)
            m_new = jnp.maximum(m_BxKxGxC, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m_BxKxGxC - m_new)
            l_new = l_BxKxGxC * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bske->bkgqe", p.astype(v_BxCxKxE.dtype), v_BxCxKxE,
                            preferred_element_type=jnp.float32)
            return (m_new, l_new, acc_BxKxGxCxE * correction[..., None] + pv), None

        init = (jnp.full((B, K, G, block), MASKED, jnp.float32), jnp.zeros((B, K, G, block), jnp.float32),
                jnp.zeros((B, K, G, block, E), jnp.float32))
        body = jax.checkpoint(key_block, prevent_cse=False)
        (_, l, acc), _ = jax.lax.scan(body, init, kv_blocks)
        out_BxKxGxCxE = acc / l[..., None]
        return None, jnp.transpose(out_BxKxGxCxE, (0, 3, 1, 2, 4)).reshape(B, block, H * E)

    _, out_nxBxCxD = jax.lax.scan(jax.checkpoint(query_block, prevent_cse=False), None,
                                  (q_blocks, blocks(segment_ids_BxT), idx_T.reshape(n, block)))
    out_BxTxD = jnp.moveaxis(out_nxBxCxD, 0, 1).reshape(B, T + pad, H * E)[:, :T]
    return out_BxTxD.astype(v_BxTxKxE.dtype)


def attention_with_cache(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, old_mask_BxTxS, k_BxTxKxE, v_BxTxKxE, new_mask_BxTxT,
                         divisor: float | None = None):
    """Attention over cached slots and the new tokens jointly, without concatenating the cache."""
    B, T, H, E = q_BxTxHxE.shape
    K = k_BxSxKxE.shape[2]
    divisor = divisor or math.sqrt(E)
    q = q_BxTxHxE.reshape(B, T, K, H // K, E)
    old = jnp.einsum("btkge,bske->bkgts", q, k_BxSxKxE, preferred_element_type=jnp.float32) / divisor
    new = jnp.einsum("btkge,bske->bkgts", q, k_BxTxKxE, preferred_element_type=jnp.float32) / divisor
    old = jnp.where(old_mask_BxTxS[:, None, None], old, MASKED)
    new = jnp.where(new_mask_BxTxT[:, None, None], new, MASKED)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1).astype(v_BxSxKxE.dtype)
    S = k_BxSxKxE.shape[1]
    out = jnp.einsum("bkgts,bske->btkge", probs[..., :S], v_BxSxKxE) + jnp.einsum(
        "bkgts,bske->btkge", probs[..., S:], v_BxTxKxE
    )
    return out.reshape(B, T, H * E)

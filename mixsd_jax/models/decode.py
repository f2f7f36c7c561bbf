"""One decode step for rows that sit at their own cache lengths, reading the cache only up to the live end.

The continuous-batching engine (sampling/engine.py) keeps one long-lived cache per side whose rows
hold unrelated sequences of different lengths. Row b of side s holds `lengths` tokens in slots
[0, lengths) with positions equal to slots, so its next token has position `lengths` and goes to
that slot. The step's rows come in groups of `sides` (row b * sides + side: a MixSD record's expert
and naive rows); side s's keys and values live in their own arrays `cache_k[s]`, `cache_v[s]`
[L, B, K, S, E]. Both choices are for the TPU: a side is a whole array, so no step views the cache
by side (a reshape of the tiled TPU layout is a copy of the whole cache), and the minor dimensions
are (slots, head dim), which tile without padding whatever the number of kv heads per device.

Attention walks a side's cache in blocks of `block` slots with an online softmax (running max, sum
and weighted values), and only over the blocks below that side's longest live row: the work and the
KV reads of a step follow the live length, not the cache capacity, and the naive rows' shorter
prompts do not walk the blocks only the expert prompts reach. The cache is read from the full
[L, B, K, S, E] array block by block (never sliced per layer first, which would copy a whole
layer's cache every step), and the step's new keys and values are scattered in place after the
layer scan.

A masked score is a finite -1e30 and every row first sees its own new token, so a block beyond a
row's length adds exactly zero: a row's result never depends on its neighbours' lengths.

A sliding-window layer (Gemma 3) also starts its walk late: at the block holding the oldest slot
inside the window of the side's shortest decoding row, so it reads at most its window (plus one
block, and the spread of the side's lengths) whatever the context length.

On a CPU in bf16 (`one_read`) the same blocks are read at once instead of walked: XLA:CPU pays for
every loop iteration of small ops (a block's copy, two tiny matmuls, the softmax update), where an
accelerator pays for every block it holds on chip. There, with `shared_B` (a MixSD record's prompts
share their first tokens, prefilled once into both sides' rows), the naive rows read those slots in
the expert cache's read, alongside the expert rows' queries, and their own cache only past them.

The layer itself is `block.block`, the one training and prefill use; only the attention differs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixsd_jax.models.attention import MASKED
from mixsd_jax.models.block import (block as decoder_block, embed, layer_from_bits, layer_variants, layers_as_bits, norm,
                                    rope_inv_freq)
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.matmul import from_bits, to_bits, to_words


def as_bits(cache) -> bool:
    """Whether a cache holds bf16 keys or values as their bit patterns (uint32 words of two,
    `matmul.to_words`: the engine's bf16 caches on a CPU, [L, B, K, S, E / 2]; or uint16): XLA:CPU
    writes into a bf16 array by converting all of it to f32 and back, into an integer one in place."""
    return cache.dtype in (jnp.uint16, jnp.uint32)


def values_dtype(cache) -> jnp.dtype:
    """The dtype of the keys or values a cache holds: bf16 for a cache of bit patterns."""
    return jnp.dtype(jnp.bfloat16) if as_bits(cache) else cache.dtype


def stored(x, cache):
    """Keys or values `x` as `cache` stores them."""
    x = x.astype(values_dtype(cache))
    return to_words(x) if cache.dtype == jnp.uint32 else to_bits(x) if cache.dtype == jnp.uint16 else x


def _read_slots(cache, layer, start, width, dtype):
    """Slots [start, start + width) of one layer of a side's cache [L, B, K, S, E]: [B, K, width, E]
    in `dtype` (a bf16 cache kept as bits read back as bf16 first)."""
    _, B, K, _, E = cache.shape  # E: the stored minor dimension (E / 2 words for bits)
    sliced = jax.lax.dynamic_slice(cache, (layer, 0, 0, start, 0), (1, B, K, width, E))[0]
    return from_bits(sliced, jnp.bfloat16).astype(dtype)


def _seen(slots, lengths_B, window, below_B=None, from_B=None):
    """[B, W]: whether each row sees each of the slots `slots` ([W], or [B, W] per row): before its
    length (or `below_B`), from `from_B` on, and inside its `window` (behind its new token)."""
    slots_BxW = jnp.broadcast_to(slots, (lengths_B.shape[0], slots.shape[-1]))
    seen_BxW = slots_BxW < (lengths_B if below_B is None else below_B)[:, None]
    if window is not None:
        seen_BxW = seen_BxW & (slots_BxW > (lengths_B - window)[:, None])
    if from_B is not None:
        seen_BxW = seen_BxW & (slots_BxW >= from_B[:, None])
    return seen_BxW


def _masked_scores(q_BxKxGxE, k_BxKxWxE, slots, lengths_B, window, scale, from_B=None):
    """Scaled scores of the queries against keys at `slots` ([W], or [B, W] per row), MASKED where a
    row does not see the slot (at or past its length, before `from_B`, or outside its `window`)."""
    s = jnp.einsum("bkge,bkse->bkgs", q_BxKxGxE, k_BxKxWxE, preferred_element_type=jnp.float32) * scale
    seen_BxW = _seen(slots, lengths_B, window, from_B=from_B)
    return jnp.where(seen_BxW[:, None, None, :], s, MASKED)


def _blocks_to_read(bound, block, window, first):
    """(first block, end block) of a side's cache that its rows may see: up to `bound`, and with a
    `window` from the block of slot `first - window + 1` (`first`: the side's shortest decoding row)."""
    first_block = 0 if window is None else jnp.maximum(first - window + 1, 0) // block
    return first_block, (bound + block - 1) // block


def _block_attention(q_BxKxGxE, k_self_BxKxE, v_self_BxKxE, cache_k, cache_v, layer, lengths_B, bound, block,
                     divisor, window=None, first=None):
    """softmax(q · [cache[:lengths], self]) · values for one side's rows, over the blocks of its
    cache [L, B, K, S, E] below `bound`. With a `window`, a row sees only the slots fewer than
    `window` behind its new token, and the walk starts at the block of slot `first - window + 1`
    (`first`: the side's shortest decoding row's length)."""
    B, K, G, E = q_BxKxGxE.shape
    scale = 1.0 / divisor
    vdtype = v_self_BxKxE.dtype
    # Both matmuls in the cache's compute dtype (bf16 x bf16 -> f32 where it is bf16): a query of
    # another dtype would have every cache block converted to it first.
    out_dtype, q_BxKxGxE = q_BxKxGxE.dtype, q_BxKxGxE.astype(vdtype)
    m_BxKxG = jnp.einsum("bkge,bke->bkg", q_BxKxGxE, k_self_BxKxE, preferred_element_type=jnp.float32) * scale
    l_BxKxG = jnp.ones_like(m_BxKxG)
    acc_BxKxGxE = jnp.broadcast_to(v_self_BxKxE[:, :, None, :], (B, K, G, E)).astype(jnp.float32)

    def one_block(i, carry):
        m, l, acc = carry
        start = i * block
        s = _masked_scores(q_BxKxGxE, _read_slots(cache_k, layer, start, block, vdtype), start + jnp.arange(block),
                           lengths_B, window, scale)
        m_new = jnp.maximum(m, s.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "bkgs,bkse->bkge", p.astype(vdtype), _read_slots(cache_v, layer, start, block, vdtype),
            preferred_element_type=jnp.float32
        )
        return m_new, l, acc

    first_block, n_blocks = _blocks_to_read(bound, block, window, first)
    _, l_BxKxG, acc_BxKxGxE = jax.lax.fori_loop(first_block, n_blocks, one_block, (m_BxKxG, l_BxKxG, acc_BxKxGxE))
    return (acc_BxKxGxE / l_BxKxG[..., None]).astype(out_dtype).reshape(B, K * G * E)


def _one_read_attention(q_BxKxGxE, k_self_BxKxE, v_self_BxKxE, cache_k, cache_v, layer, lengths_B, bound, block,
                        divisor, window=None, first=None):
    """`_block_attention`'s result from one read of the blocks it would walk: the slots from the
    walk's first block up to `bound`, rounded out to whole blocks, as one matmul per operand (a
    `lax.switch` over the possible block counts, so each branch has static shapes)."""
    B, K, G, E = q_BxKxGxE.shape
    S = cache_k.shape[3]
    scale = 1.0 / divisor
    vdtype = v_self_BxKxE.dtype
    out_dtype, q_BxKxGxE = q_BxKxGxE.dtype, q_BxKxGxE.astype(vdtype)
    s_self_BxKxG = jnp.einsum("bkge,bke->bkg", q_BxKxGxE, k_self_BxKxE, preferred_element_type=jnp.float32) * scale
    first_block, n_blocks = _blocks_to_read(bound, block, window, first)
    counts = -(-S // block)  # a branch per number of blocks read: 1 .. every block of the cache

    def over(width):
        def attend():
            start = jnp.minimum(first_block * block, S - width)  # the read stays inside the cache
            s = _masked_scores(q_BxKxGxE, _read_slots(cache_k, layer, start, width, vdtype), start + jnp.arange(width),
                               lengths_B, window, scale)
            m = jnp.maximum(s.max(axis=-1), s_self_BxKxG)  # every row sees its own new token
            p, p_self = jnp.exp(s - m[..., None]), jnp.exp(s_self_BxKxG - m)
            acc = jnp.einsum("bkgs,bkse->bkge", p.astype(vdtype), _read_slots(cache_v, layer, start, width, vdtype),
                             preferred_element_type=jnp.float32)
            acc = acc + p_self[..., None] * v_self_BxKxE[:, :, None, :].astype(jnp.float32)
            return acc / (p.sum(axis=-1) + p_self)[..., None]
        return attend

    branches = [over(min(n * block, S)) for n in range(1, counts + 1)]
    out = jax.lax.switch(jnp.clip(n_blocks - first_block - 1, 0, counts - 1), branches)
    return out.astype(out_dtype).reshape(B, K * G * E)


def _read_rows(cache, layer, starts_B, width, dtype):
    """Slots [starts_B[b], + width) of row b of one layer of a side's cache [L, B, K, S, E]:
    [B, K, width, E] in `dtype` (one gather; each start at most S - width)."""
    _, _, K, _, E = cache.shape

    def row(cache_LxKxSxE, start):
        return jax.lax.dynamic_slice(cache_LxKxSxE, (layer, 0, start, 0), (1, K, width, E))[0]

    rows = jax.vmap(row, in_axes=(1, 0))(cache, starts_B)
    return from_bits(rows, jnp.bfloat16).astype(dtype)


def _softmax_part(s_BxKxQxW, v_BxKxWxE):
    """(max, sum of exps, exp-weighted values) of scores over one part of the slots: parts combine
    in `_combine_parts` to the softmax over all of them."""
    m = s_BxKxQxW.max(axis=-1)
    p = jnp.exp(s_BxKxQxW - m[..., None])
    acc = jnp.einsum("bkqs,bkse->bkqe", p.astype(v_BxKxWxE.dtype), v_BxKxWxE, preferred_element_type=jnp.float32)
    return m, p.sum(axis=-1), acc


def _combine_parts(*parts):
    """softmax(scores) · values over the union of the parts' slots. A part whose slots are all
    masked weighs exp(MASKED - m) = 0: every query's parts include its own new token."""
    m = functools.reduce(jnp.maximum, [part[0] for part in parts])
    l = sum(part[1] * jnp.exp(part[0] - m) for part in parts)
    acc = sum(part[2] * jnp.exp(part[0] - m)[..., None] for part in parts)
    return acc / l[..., None]


def _shared_prefix_attention(q_BxSxKxGxE, k_self_BxSxKxE, v_self_BxSxKxE, cache_k, cache_v, layer, lengths_BxS,
                             shared_B, bounds, block, divisor, window, firsts, reach):
    """`_one_read_attention` of both sides of MixSD rows whose first `shared_B[b]` slots hold the same
    keys and values on both sides (the prompts' shared prefix, prefilled once): the expert's cache
    is read once for both sides' queries (the naive rows see its slots below `shared_B`), and the
    naive cache only from each row's `shared_B` on, up to `reach` slots (a gather of per-row
    windows, whole blocks wide): the naive read skips its prompt's shared part (54 of its 60 prompt
    tokens on `mixsd bench generate`'s workload), for a second set of queries in the expert's read.
    Returns [B, 2, K * G * E]."""
    B, _, K, G, E = q_BxSxKxGxE.shape
    S = cache_k[0].shape[3]
    scale = 1.0 / divisor
    vdtype = v_self_BxSxKxE.dtype
    out_dtype, q_BxSxKxGxE = q_BxSxKxGxE.dtype, q_BxSxKxGxE.astype(vdtype)
    len_e, len_n = lengths_BxS[:, 0], lengths_BxS[:, 1]
    s_self_BxSxKxG = jnp.einsum("bskge,bske->bskg", q_BxSxKxGxE, k_self_BxSxKxE,
                                preferred_element_type=jnp.float32) * scale
    v_self_BxSxKxGxE = jnp.broadcast_to(v_self_BxSxKxE[:, :, :, None, :], (B, 2, K, G, E)).astype(jnp.float32)
    self_parts = [(s_self_BxSxKxG[:, side], jnp.ones_like(s_self_BxSxKxG[:, side]), v_self_BxSxKxGxE[:, side])
                  for side in range(2)]
    counts = -(-S // block)
    q_BxKx2GxE = jnp.concatenate([q_BxSxKxGxE[:, 0], q_BxSxKxGxE[:, 1]], axis=2)
    first_block, n_blocks = _blocks_to_read(bounds[0], block, window, jnp.minimum(firsts[0], firsts[1]))

    def expert_cache(width):
        def read():
            start = jnp.minimum(first_block * block, S - width)
            slots_W = start + jnp.arange(width)
            s = jnp.einsum("bkqe,bkse->bkqs", q_BxKx2GxE, _read_slots(cache_k[0], layer, start, width, vdtype),
                           preferred_element_type=jnp.float32) * scale
            seen_Bx2xW = jnp.stack([_seen(slots_W, len_e, window),
                                    _seen(slots_W, len_n, window, below_B=shared_B)], axis=1)
            seen_Bx1x2GxW = jnp.repeat(seen_Bx2xW, G, axis=1)[:, None]
            return _softmax_part(jnp.where(seen_Bx1x2GxW, s, MASKED),
                                 _read_slots(cache_v[0], layer, start, width, vdtype))
        return read

    def naive_cache(width):
        def read():
            starts_B = jnp.minimum(shared_B, S - width)
            s = _masked_scores(q_BxSxKxGxE[:, 1], _read_rows(cache_k[1], layer, starts_B, width, vdtype),
                               starts_B[:, None] + jnp.arange(width)[None, :], len_n, window, scale, from_B=shared_B)
            return _softmax_part(s, _read_rows(cache_v[1], layer, starts_B, width, vdtype))
        return read

    branch = lambda n: jnp.clip(n - 1, 0, counts - 1)  # noqa: E731 - n blocks -> its branch
    m, l, acc = jax.lax.switch(branch(n_blocks - first_block), [expert_cache(min(n * block, S))
                                                                for n in range(1, counts + 1)])
    own = jax.lax.switch(branch(-(-reach // block)), [naive_cache(min(n * block, S)) for n in range(1, counts + 1)])
    expert = _combine_parts((m[:, :, :G], l[:, :, :G], acc[:, :, :G]), self_parts[0])
    naive = _combine_parts((m[:, :, G:], l[:, :, G:], acc[:, :, G:]), own, self_parts[1])
    return jnp.stack([expert, naive], axis=1).astype(out_dtype).reshape(B, 2, K * G * E)


def decode_step(params, cfg: ModelConfig, tokens_R, lengths_R, write_R, cache_k: tuple, cache_v: tuple, bounds, *,
                dtype, block, activation_dtype=None, bf16_as_bits=False, one_read=False, shared_B=None):
    """Feed one token per row; returns (final-norm hidden [R, D], cache_k, cache_v).

    `cache_k`, `cache_v`: one [L, B, K, S, E] array per side (R = B * sides rows, row b * sides + s
    in side s's row b). `write_R` is the slot each row's new key/value goes to (a row that is not
    decoding passes the capacity S: the write is dropped). `bounds` [sides]: no row of side s reads a
    slot at or past bounds[s]. `activation_dtype` (default `dtype`): the residual stream's and the
    elementwise work's dtype, with the matmuls' operands in `dtype` (transformer.forward).
    `bf16_as_bits` (for XLA:CPU): the layer scan slices bf16 weights and stacks the new keys and
    values as their bit patterns (block.layers_as_bits). `one_read` (for XLA:CPU): each side's
    attention reads the blocks below its bound at once instead of walking them (`_one_read_attention`).
    `shared_B` (with `one_read` and two sides): slot b's first `shared_B[b]` slots hold the same keys
    and values on both sides, and the naive rows read them from the expert's cache
    (`_shared_prefix_attention`).
    """
    sides = len(cache_k)
    R, B = tokens_R.shape[0], tokens_R.shape[0] // sides
    K, E, H = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    S = cache_k[0].shape[3]
    variants = layer_variants(cfg)
    inv_freq = rope_inv_freq(cfg)
    positions_Rx1 = lengths_R[:, None]
    by_side = lambda x: x.reshape(B, sides, *x.shape[1:])  # noqa: E731 - rows -> [B, sides, ...]
    lengths_BxS, write_BxS = by_side(lengths_R), by_side(write_R)
    # The shortest decoding row of each side: where a sliding window's walk over the cache starts.
    firsts = jnp.min(jnp.where(write_BxS < S, lengths_BxS, S), axis=0)
    shared_read = one_read and sides == 2 and shared_B is not None
    if shared_read:  # the naive cache slots past the shared prefix that a decoding naive row reads
        reach = jnp.max(jnp.where(write_BxS[:, 1] < S, lengths_BxS[:, 1] - shared_B, 0))

    def attend(layer, window, q_Rx1xHxE, k_Rx1xKxE, v_Rx1xKxE):
        # Through the cache dtype first, so this step sees its own key exactly as later steps will.
        k_RxKxE = k_Rx1xKxE[:, 0].astype(values_dtype(cache_k[0])).astype(dtype)
        v_RxKxE = v_Rx1xKxE[:, 0].astype(values_dtype(cache_v[0])).astype(dtype)
        q_BxSxKxGxE = by_side(q_Rx1xHxE[:, 0].reshape(R, K, H // K, E))
        k_BxSxKxE, v_BxSxKxE = by_side(k_RxKxE), by_side(v_RxKxE)
        if shared_read:
            attn = _shared_prefix_attention(q_BxSxKxGxE, k_BxSxKxE, v_BxSxKxE, cache_k, cache_v, layer, lengths_BxS,
                                            shared_B, bounds, block, cfg.attention_divisor, window, firsts, reach)
            return attn.reshape(R, 1, -1), (stored(k_RxKxE, cache_k[0]), stored(v_RxKxE, cache_v[0]))
        attention = _one_read_attention if one_read else _block_attention
        attn = jnp.stack([
            attention(q_BxSxKxGxE[:, s], k_BxSxKxE[:, s], v_BxSxKxE[:, s], cache_k[s], cache_v[s], layer,
                      lengths_BxS[:, s], bounds[s], block, cfg.attention_divisor, window, firsts[s])
            for s in range(sides)
        ], axis=1).reshape(R, 1, -1)
        return attn, (stored(k_RxKxE, cache_k[0]), stored(v_RxKxE, cache_v[0]))

    def layer_body(x_Rx1xD, inputs):
        p, layer, variant = inputs
        p = layer_from_bits(p)
        window = None if variant is None else variant["window"]
        x_Rx1xD, kv, _ = decoder_block(p, cfg, x_Rx1xD, positions_Rx1,
                                       inv_freq if variant is None else variant["inv_freq"],
                                       functools.partial(attend, layer, window), dtype=dtype)
        return x_Rx1xD, kv

    x_Rx1xD = embed(params, cfg, tokens_R[:, None], activation_dtype or dtype)
    x_Rx1xD, (k_LxRxKxE, v_LxRxKxE) = jax.lax.scan(layer_body, x_Rx1xD,
                                                   (layers_as_bits(params["layers"], bf16_as_bits),
                                                    jnp.arange(cfg.num_layers), variants))
    def write(cache, new_LxRxKxE, s):
        new_BxLxKxE = by_side(jnp.moveaxis(new_LxRxKxE, 1, 0))[:, s]  # already as the cache stores it
        return write_step(cache, new_BxLxKxE, write_BxS[:, s])

    cache_k = tuple(write(c, k_LxRxKxE, s) for s, c in enumerate(cache_k))
    cache_v = tuple(write(c, v_LxRxKxE, s) for s, c in enumerate(cache_v))
    return norm(x_Rx1xD[:, 0], params["final_norm"], cfg), cache_k, cache_v


def write_step(cache_LxBxKxSxE, new_BxLxKxE, slots_B):
    """Row b's new key (or value) of every layer at its slot `slots_B[b]` of the cache (a slot past
    the cache is dropped)."""
    return jax.lax.platform_dependent(cache_LxBxKxSxE, new_BxLxKxE, slots_B, tpu=_write_step_per_layer,
                                      default=_write_step_whole)


def _write_step_whole(cache, new_BxLxKxE, slots_B):
    # One scatter into the whole array; indexing [:, rows, :, slots] puts the row index dimension
    # first, so the update is [B, L, K, E].
    return cache.at[:, jnp.arange(cache.shape[1]), :, slots_B].set(new_BxLxKxE, mode="drop")


def _write_step_per_layer(cache, new_BxLxKxE, slots_B):
    # On a TPU, one layer at a time with every (row, kv head) its own index: the scatter's only
    # window is the minor E, which XLA:TPU writes in the cache's own layout. Scattering [K, E]
    # windows of the whole [L, B, K, S, E] array made it hold the cache in an [L, B, S, K, E] layout
    # inside the segment's loop: a copy of every cache array in and out of each segment (one cache
    # of temporaries). The scatter indexes the whole array, layer included: taking the layer's
    # [B, K, S, E] out first and putting it back made XLA:TPU copy that layer's cache on chip and
    # write it back to HBM, every layer of every step (twice the step's KV reads, in writes). On a
    # CPU the loop costs more than it saves (the whole scatter stays there).
    rows_B, heads_K = jnp.arange(cache.shape[1]), jnp.arange(cache.shape[2])

    def one_layer(layer, cache):
        new_BxKxE = jax.lax.dynamic_index_in_dim(new_BxLxKxE, layer, 1, keepdims=False)
        return cache.at[layer, rows_B[:, None], heads_K[None, :], slots_B[:, None]].set(new_BxKxE, mode="drop")

    return jax.lax.fori_loop(0, cache.shape[0], one_layer, cache)

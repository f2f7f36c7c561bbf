"""Decoder-only transformer (Llama / Qwen2 / Qwen3) as pure functions over a parameter pytree.

Conventions. Dimension letters in names: B batch, T new tokens, S cache slots, D hidden, H query
heads, K kv heads, G = H/K query heads per kv head, E head dim, F ffn, V vocab, L layers.
Parameters are a plain nested dict; per-layer weights are stacked on a leading L axis so the layer
stack is one `lax.scan` (compile time independent of depth). Linear weights are stored [in, out].

Attention masking is by *segment ids* and *slots*: token t of row b may attend to key s if both are
real tokens (segment != 0) of the same segment and s is not in its future. Packing, padding and
incremental decoding are all this one rule.

The KV cache is a dict: `k`, `v` [L, B, S, K, E], `valid` [B, S] (slot holds a real token) and `end` (scalar int32: next
slot to write; the same for every row, because prompts are right-padded into the same slots and
positions are carried explicitly, so slots need not equal positions).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from mixsd_jax.models.config import ModelConfig

Params = dict[str, Any]
Cache = dict[str, jax.Array]

_MASKED = -1e30  # finite, so a fully masked (pad) query row yields a finite softmax, not NaN


# ----------------------------------------------------------------------------- parameters


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """Shapes of every parameter, the single source of truth for init, loading and sharding."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    layers = {
        "attn_norm": (L, D),
        "wq": (L, D, cfg.q_dim),
        "wk": (L, D, cfg.kv_dim),
        "wv": (L, D, cfg.kv_dim),
        "wo": (L, cfg.q_dim, D),
        "mlp_norm": (L, D),
        "w_gate": (L, D, F),
        "w_up": (L, D, F),
        "w_down": (L, F, D),
    }
    if cfg.qkv_bias:
        layers.update(bq=(L, cfg.q_dim), bk=(L, cfg.kv_dim), bv=(L, cfg.kv_dim))
    if cfg.qk_norm:
        layers.update(q_norm=(L, cfg.head_dim), k_norm=(L, cfg.head_dim))
    shapes: dict[str, Any] = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (normal 0.02, norms at 1, biases at 0): for tests and benchmarks."""
    flat, treedef = jax.tree.flatten_with_path(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    leaves = []
    for i, (path, shape) in enumerate(flat):
        name = path[-1].key
        if name.endswith("norm"):
            leaves.append(jnp.ones(shape, dtype))
        elif name.startswith("b"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((0.02 * jax.random.normal(jax.random.fold_in(key, i), shape)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- pieces


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # As transformers: normalise in f32, cast back, then scale.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    E = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    # llama3: long wavelengths slowed by `factor`, short kept, a smooth blend in between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, blended, scaled)


def apply_rope(x_BxTxNxE: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    # Half-split rotation (transformers' rotate_half), angles in f32.
    angles_BxTxE2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BxTxE2)[:, :, None, :]
    sin = jnp.sin(angles_BxTxE2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxNxE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxE.dtype)


def attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS) -> jax.Array:
    B, T, H, E = q_BxTxHxE.shape
    K = k_BxSxKxE.shape[2]
    q_BxTxKxGxE = q_BxTxHxE.reshape(B, T, K, H // K, E)
    scores = jnp.einsum("btkge,bske->bkgts", q_BxTxKxGxE, k_BxSxKxE, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(E)
    scores = jnp.where(mask_BxTxS[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxE.dtype)
    out = jnp.einsum("bkgts,bske->btkge", probs, v_BxSxKxE)
    return out.reshape(B, T, H * E)


def blockwise_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT, block: int) -> jax.Array:
    """`attention` over the sequence itself (causal, same segment, real tokens), computed block by
    block with an online softmax (FlashAttention's recurrence), so no [T, T] scores exist: the
    largest buffer is one [block, block] tile of scores per head. Both loops are rematerialised, so
    the backward pass keeps one running (max, sum, output) per query block and key block instead of
    the probabilities. Equal to `attention` to round-off, pad rows included (a fully masked row
    averages every value in both)."""
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
    scale = 1.0 / math.sqrt(E)

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
            # Keys past T (block padding) rank below masked ones, so a fully masked query averages
            # the T real values, as in `attention`.
            masked_C = jnp.where(idx_k_C < T, _MASKED, 3 * _MASKED)
            s = jnp.where(mask_BxCxC[:, None, None], s, masked_C)
            m_new = jnp.maximum(m_BxKxGxC, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m_BxKxGxC - m_new)
            l_new = l_BxKxGxC * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bske->bkgqe", p.astype(v_BxCxKxE.dtype), v_BxCxKxE,
                            preferred_element_type=jnp.float32)
            return (m_new, l_new, acc_BxKxGxCxE * correction[..., None] + pv), None

        init = (jnp.full((B, K, G, block), _MASKED, jnp.float32), jnp.zeros((B, K, G, block), jnp.float32),
                jnp.zeros((B, K, G, block, E), jnp.float32))
        body = jax.checkpoint(key_block, prevent_cse=False)
        (_, l, acc), _ = jax.lax.scan(body, init, kv_blocks)
        out_BxKxGxCxE = acc / l[..., None]
        return None, jnp.transpose(out_BxKxGxCxE, (0, 3, 1, 2, 4)).reshape(B, block, H * E)

    _, out_nxBxCxD = jax.lax.scan(jax.checkpoint(query_block, prevent_cse=False), None,
                                  (q_blocks, blocks(segment_ids_BxT), idx_T.reshape(n, block)))
    out_BxTxD = jnp.moveaxis(out_nxBxCxD, 0, 1).reshape(B, T + pad, H * E)[:, :T]
    return out_BxTxD.astype(v_BxTxKxE.dtype)


def attention_with_cache(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, old_mask_BxTxS, k_BxTxKxE, v_BxTxKxE, new_mask_BxTxT):
    """Attention over cached slots and the new tokens jointly, without concatenating the cache."""
    B, T, H, E = q_BxTxHxE.shape
    K = k_BxSxKxE.shape[2]
    q = q_BxTxHxE.reshape(B, T, K, H // K, E)
    old = jnp.einsum("btkge,bske->bkgts", q, k_BxSxKxE, preferred_element_type=jnp.float32) / math.sqrt(E)
    new = jnp.einsum("btkge,bske->bkgts", q, k_BxTxKxE, preferred_element_type=jnp.float32) / math.sqrt(E)
    old = jnp.where(old_mask_BxTxS[:, None, None], old, _MASKED)
    new = jnp.where(new_mask_BxTxT[:, None, None], new, _MASKED)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1).astype(v_BxSxKxE.dtype)
    S = k_BxSxKxE.shape[1]
    out = jnp.einsum("bkgts,bske->btkge", probs[..., :S], v_BxSxKxE) + jnp.einsum(
        "bkgts,bske->btkge", probs[..., S:], v_BxTxKxE
    )
    return out.reshape(B, T, H * E)


def _linear(x, w, dtype):
    # As one 2-D matmul over the flattened leading dims: differentiated, the weight gradient is
    # then a plain [in, N] x [N, out] matmul. Through "...i,io->...o" on [B, T, in] it contracts
    # two dims at once, which XLA:CPU runs off its fast matmul path (2x slower for SmolLM2's MLP).
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w.astype(dtype))
    return y.reshape(*x.shape[:-1], w.shape[-1])


# ----------------------------------------------------------------------------- forward


def _layer(p, cfg: ModelConfig, x_BxTxD, positions_BxT, inv_freq, new_mask_BxTxT, cached, old_mask_BxTxS, dtype,
           segment_ids_BxT=None, attention_block=0, mlp_delta_BxTxD=None, mlp_taps=None):
    """One decoder block; returns the new hidden states and this call's keys and values.

    Model editing hooks: `mlp_delta_BxTxD` is added to the MLP's output; `mlp_taps` (a list) receives
    the down-projection's input."""
    B, T, _ = x_BxTxD.shape
    h = rms_norm(x_BxTxD, p["attn_norm"], cfg.rms_norm_eps)
    q = _linear(h, p["wq"], dtype)
    k = _linear(h, p["wk"], dtype)
    v = _linear(h, p["wv"], dtype)
    if cfg.qkv_bias:
        q, k, v = q + p["bq"].astype(dtype), k + p["bk"].astype(dtype), v + p["bv"].astype(dtype)
    q_BxTxHxE = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
    k_BxTxKxE = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v_BxTxKxE = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q_BxTxHxE = rms_norm(q_BxTxHxE, p["q_norm"], cfg.rms_norm_eps)
        k_BxTxKxE = rms_norm(k_BxTxKxE, p["k_norm"], cfg.rms_norm_eps)
    q_BxTxHxE = apply_rope(q_BxTxHxE, positions_BxT, inv_freq)
    k_BxTxKxE = apply_rope(k_BxTxKxE, positions_BxT, inv_freq)
    if cached is None:
        if attention_block:
            attn = blockwise_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT, attention_block)
        else:
            attn = attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, new_mask_BxTxT)
    else:
        k_old, v_old = cached
        # Round the new keys through the cache dtype so a bf16 cache gives the same result now and later.
        k_new = k_BxTxKxE.astype(k_old.dtype).astype(dtype)
        v_new = v_BxTxKxE.astype(v_old.dtype).astype(dtype)
        attn = attention_with_cache(
            q_BxTxHxE, k_old.astype(dtype), v_old.astype(dtype), old_mask_BxTxS, k_new, v_new, new_mask_BxTxT
        )
    x_BxTxD = x_BxTxD + _linear(attn, p["wo"], dtype)
    h = rms_norm(x_BxTxD, p["mlp_norm"], cfg.rms_norm_eps)
    gated = jax.nn.silu(_linear(h, p["w_gate"], dtype)) * _linear(h, p["w_up"], dtype)
    mlp_out_BxTxD = _linear(gated, p["w_down"], dtype)
    if mlp_taps is not None:
        mlp_taps.append(gated)
    if mlp_delta_BxTxD is not None:
        mlp_out_BxTxD = mlp_out_BxTxD + mlp_delta_BxTxD.astype(mlp_out_BxTxD.dtype)
    return x_BxTxD + mlp_out_BxTxD, k_BxTxKxE, v_BxTxKxE


# Rematerialisation of the layer scan (training): which of a block's intermediates the backward
# pass keeps; the rest it recomputes from the block's input. "none" keeps all (fastest, most
# memory), "full" keeps only the block inputs (one [B, T, D] per layer), "dots" keeps the outputs
# of the weight matmuls but recomputes attention scores and elementwise work; the argument-free
# `jax.checkpoint_policies` are accepted by their own names too.
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "dots": "dots_with_no_batch_dims_saveable",
    # The plain (argument-free) jax.checkpoint_policies, by their own names.
    **{name: name for name in ("everything_saveable", "nothing_saveable", "dots_saveable",
                               "dots_with_no_batch_dims_saveable", "checkpoint_dots",
                               "checkpoint_dots_with_no_batch_dims")},
}


def remat_policy(name: str):
    """The jax.checkpoint policy for a `remat` setting (None for "none")."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r} (known: {', '.join(REMAT_POLICIES)})")
    return None if name == "none" else getattr(jax.checkpoint_policies, REMAT_POLICIES[name])


def _run_layers(params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, cached, old_mask_BxTxS, dtype, remat="none",
                attention_block=0, activation_sharding=None, mlp_edit=None, taps=None):
    """All blocks: hidden [B,T,D] before the final norm, new keys and values per layer.

    Model editing: `mlp_edit=(layer, delta_BxTxD)` adds the delta to that layer's MLP output; with
    `taps` (a dict) set, it receives the per-layer down-projection inputs and block outputs."""
    T = tokens_BxT.shape[1]
    inv_freq = rope_inv_freq(cfg)
    idx = jnp.arange(T)
    # Among the T new tokens: causal, same segment, real tokens only (blockwise attention builds
    # its tiles of this mask itself).
    new_mask_BxTxT = None if attention_block else (
        (idx[:, None] >= idx[None, :])[None]
        & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
        & (segment_ids_BxT != 0)[:, :, None]
    )
    x_BxTxD = params["embed"].astype(dtype)[tokens_BxT]
    if activation_sharding is not None:
        # Pin the residual stream to the batch sharding: left to propagation, it takes the
        # embedding's layout (hidden over fsdp, rows replicated), so every device would keep every
        # row's activations for the backward pass.
        x_BxTxD = jax.lax.with_sharding_constraint(x_BxTxD, activation_sharding)
    layer = functools.partial(
        _layer, cfg=cfg, positions_BxT=positions_BxT, inv_freq=inv_freq, new_mask_BxTxT=new_mask_BxTxT,
        old_mask_BxTxS=old_mask_BxTxS, dtype=dtype, segment_ids_BxT=segment_ids_BxT, attention_block=attention_block,
    )
    def scan_body(x, inputs):
        p, layer_cache, layer_index = inputs
        delta = None
        if mlp_edit is not None:  # added at every layer, zero except at the edited one
            delta = jnp.where(layer_index == mlp_edit[0], mlp_edit[1], 0)
        mlp_in = [] if taps is not None else None
        x, k, v = layer(p, x_BxTxD=x, cached=layer_cache, mlp_delta_BxTxD=delta, mlp_taps=mlp_in)
        if activation_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, activation_sharding)
        if taps is not None:
            return x, (k, v, mlp_in[0], x)
        return x, (k, v)

    if remat != "none":
        # prevent_cse=False: inside a scan the recomputation cannot be merged away anyway.
        scan_body = jax.checkpoint(scan_body, policy=remat_policy(remat), prevent_cse=False)

    layer_ids = jnp.arange(cfg.num_layers)
    x_BxTxD, outs = jax.lax.scan(scan_body, x_BxTxD, (params["layers"], cached, layer_ids))
    if taps is not None:
        taps["mlp_in"], taps["resid_out"] = outs[2], outs[3]
    return x_BxTxD, outs[0], outs[1]


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array,
    cache: Cache | None = None,
    *,
    dtype=jnp.float32,
    remat: str = "none",
    attention_block: int = 0,
    activation_sharding=None,
) -> tuple[jax.Array, Cache | None]:
    """Final-norm hidden states [B, T, D] (apply `lm_logits` for logits) and the updated cache.

    Without a cache: full-sequence attention with causal + same-segment masking (padding = segment 0).
    With a cache: the T new tokens attend to every valid cached slot and causally to each other,
    and are then written at slots [end, end+T) of every row. `remat` (see REMAT_POLICIES) only
    matters under differentiation; `attention_block` > 0 computes the cache-less attention block
    by block (`blockwise_attention`), for long sequences; `activation_sharding` (a sharding of
    [B, T, D]) pins the residual stream's layout between blocks.
    """
    if cache is None:
        x_BxTxD, _, _ = _run_layers(params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, None, None, dtype, remat,
                                    attention_block, activation_sharding)
        return rms_norm(x_BxTxD, params["final_norm"], cfg.rms_norm_eps), None
    is_real_BxT = segment_ids_BxT != 0
    # Cached slots all precede the new tokens: a real query sees every valid one.
    old_mask_BxTxS = is_real_BxT[:, :, None] & cache["valid"][:, None, :]
    x_BxTxD, new_k, new_v = _run_layers(
        params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, (cache["k"], cache["v"]), old_mask_BxTxS, dtype
    )
    end = cache["end"]
    # The cache is only read inside the layers and written here once, in place.
    return rms_norm(x_BxTxD, params["final_norm"], cfg.rms_norm_eps), {
        "k": _write_slots(cache["k"], new_k, end),
        "v": _write_slots(cache["v"], new_v, end),
        "valid": jax.lax.dynamic_update_slice(cache["valid"], is_real_BxT, (0, end)),
        "end": end + tokens_BxT.shape[1],
    }


def segment_positions(segment_ids_BxT: jax.Array) -> jax.Array:
    """Positions 0.. within each segment of a packed row; pads get 0."""
    T = segment_ids_BxT.shape[1]
    idx_T = jnp.arange(T)
    starts = jnp.concatenate([jnp.ones_like(segment_ids_BxT[:, :1], bool),
                              segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    start_BxT = jax.lax.cummax(jnp.where(starts, idx_T, 0), axis=1)
    return (idx_T - start_BxT) * (segment_ids_BxT != 0)


def forward_with_taps(
    params: Params,
    cfg: ModelConfig,
    tokens_BxT: jax.Array,
    segment_ids_BxT: jax.Array,
    *,
    mlp_edit: tuple[Any, jax.Array] | None = None,
    dtype=jnp.float32,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [B, T, V] and taps for model editing: "mlp_in" [L, B, T, F] (each layer's input to its
    MLP down-projection) and "resid_out" [L, B, T, D] (each block's output). Positions restart at
    each segment, so packed rows work. `mlp_edit=(layer, delta_BxTxD)` adds the delta to that
    layer's MLP output (hence to its block output and everything after); `layer` may be traced."""
    positions_BxT = segment_positions(segment_ids_BxT)
    taps: dict[str, jax.Array] = {}
    x_BxTxD, _, _ = _run_layers(params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, None, None, dtype,
                                mlp_edit=mlp_edit, taps=taps)
    hidden_BxTxD = rms_norm(x_BxTxD, params["final_norm"], cfg.rms_norm_eps)
    return lm_logits(params, cfg, hidden_BxTxD, dtype=dtype), taps


def prefill(
    params: Params,
    cfg: ModelConfig,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array,
    slots: int,
    *,
    dtype=jnp.float32,
    cache_dtype=None,
) -> tuple[jax.Array, Cache]:
    """Forward a (right-padded) batch of prompts and return a cache of `slots` slots holding them."""
    x_BxTxD, new_k, new_v = _run_layers(params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, None, None, dtype)
    B, T = tokens_BxT.shape
    cache = init_cache(cfg, B, slots, cache_dtype or dtype)
    zero = jnp.zeros((), jnp.int32)
    return rms_norm(x_BxTxD, params["final_norm"], cfg.rms_norm_eps), {
        "k": _write_slots(cache["k"], new_k, zero),
        "v": _write_slots(cache["v"], new_v, zero),
        "valid": jax.lax.dynamic_update_slice(cache["valid"], segment_ids_BxT != 0, (0, 0)),
        "end": jnp.asarray(T, jnp.int32),
    }


def _write_slots(cache_kv, new_kv, end):
    return jax.lax.dynamic_update_slice(cache_kv, new_kv.astype(cache_kv.dtype), (0, 0, end, 0, 0))


def lm_logits(params: Params, cfg: ModelConfig, hidden_xD: jax.Array, *, dtype=jnp.float32) -> jax.Array:
    """Vocabulary logits (f32) for any leading shape of hidden states."""
    if cfg.tie_word_embeddings:
        return jnp.einsum("...d,vd->...v", hidden_xD.astype(dtype), params["embed"].astype(dtype),
                          preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", hidden_xD.astype(dtype), params["lm_head"].astype(dtype),
                      preferred_element_type=jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> Cache:
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "valid": jnp.zeros((batch, slots), bool),
        "end": jnp.zeros((), jnp.int32),
    }


def padded_positions(segment_ids_BxT: jax.Array) -> jax.Array:
    """Positions 0.. along each row's real tokens (right padding); pads get 0."""
    real = (segment_ids_BxT != 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0) * real

"""Decoder-only transformer (Llama / Qwen2 / Qwen3 / Gemma 3) as pure functions over a parameter pytree.

Conventions. Dimension letters in names: B batch, T new tokens, S cache slots, D hidden, H query
heads, K kv heads, G = H/K query heads per kv head, E head dim, F ffn, V vocab, L layers.
Parameters are a plain nested dict; per-layer weights are stacked on a leading L axis so the layer
stack is one `lax.scan` (compile time independent of depth). Linear weights are stored [in, out].

Attention masking is by *segment ids* and *slots*: token t of row b may attend to key s if both are
real tokens (segment != 0) of the same segment and s is not in its future. Packing, padding and
incremental decoding are all this one rule.

The KV cache is a dict: `k`, `v` [L, B, S, K, E], `valid` [B, S] (slot holds a real token) and `end` (scalar int32: next
slot to write; the same for every row, because prompts are right-padded into the same slots and
positions are carried explicitly, so slots need not equal positions). Models with sliding-window
layers also keep `positions` [B, S] (each slot's position), which their windows are measured in.

The layers themselves are `block.block`, one function for training, prefill and decoding; this
module chooses how they attend (dense, blockwise or against the cache) and scans them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mixsd_jax.models.attention import (
    attention, attention_with_cache, blockwise_attention, sequence_mask, within_window,
)
from mixsd_jax.models.block import block, embed, layer_from_bits, layer_variants, layers_as_bits, norm, rope_inv_freq
from mixsd_jax.models.config import ModelConfig

Params = dict[str, Any]
Cache = dict[str, jax.Array]


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
    if cfg.sandwich_norms:
        layers.update(post_attn_norm=(L, D), post_mlp_norm=(L, D))
    shapes: dict[str, Any] = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (normal 0.02, norms at 1, biases at 0): for tests and benchmarks. Norms
    stored as an offset from 1 (Gemma) start at 0."""
    flat, treedef = jax.tree.flatten_with_path(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    leaves = []
    for i, (path, shape) in enumerate(flat):
        name = path[-1].key
        if name.endswith("norm"):
            leaves.append(jnp.zeros(shape, dtype) if cfg.norm_offset else jnp.ones(shape, dtype))
        elif name.startswith("b"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((0.02 * jax.random.normal(jax.random.fold_in(key, i), shape)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)



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


# ----------------------------------------------------------------------------- forward


def _attend_fn(cfg: ModelConfig, dtype, positions_BxT, segment_ids_BxT, seq_mask_BxTxT, attention_block, cached,
               old_mask_BxTxS, old_positions_BxS, window, fused_attention=None, matmul_dtype=None):
    """How this call's blocks attend: over the sequence (a fused kernel, dense or blockwise) or
    against the cache. Returns the attention output and the (keys, values) each layer hands back
    for caching. `matmul_dtype`: the matmul dtype of the dense and the cached attention where it
    differs from the activations' (`attention`)."""
    divisor = cfg.attention_divisor
    new_mask_BxTxT = seq_mask_BxTxT
    if window is not None and seq_mask_BxTxT is not None:
        new_mask_BxTxT = seq_mask_BxTxT & within_window(positions_BxT, positions_BxT, window)

    def attend(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE):
        if cached is None:
            if fused_attention is not None and window is None:  # models.flash_attention (a TPU kernel)
                out = fused_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT, divisor)
            elif attention_block:
                out = blockwise_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT, attention_block, divisor,
                                          window)
            else:
                out = attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, new_mask_BxTxT, divisor, matmul_dtype)
            return out, (k_BxTxKxE, v_BxTxKxE)
        k_old, v_old = cached
        old_mask = old_mask_BxTxS
        if window is not None:
            old_mask = old_mask & within_window(positions_BxT, old_positions_BxS, window)
        # Round the new keys through the cache dtype so a bf16 cache gives the same result now and later.
        k_new = k_BxTxKxE.astype(k_old.dtype).astype(dtype)
        v_new = v_BxTxKxE.astype(v_old.dtype).astype(dtype)
        if matmul_dtype is not None:
            # f32 activations around bf16 matmuls (a CPU): the cached and the new keys side by side, so
            # both matmuls take the library's batched form (`attention`'s matmul_dtype) instead of
            # f32 einsums with the batch axes mid-array (1.8x the time of a prefill of as many tokens).
            out = attention(q_BxTxHxE, jnp.concatenate([k_old.astype(dtype), k_new], axis=1),
                            jnp.concatenate([v_old.astype(dtype), v_new], axis=1),
                            jnp.concatenate([old_mask, new_mask_BxTxT], axis=-1), divisor, matmul_dtype)
            return out, (k_BxTxKxE, v_BxTxKxE)
        out = attention_with_cache(q_BxTxHxE, k_old.astype(dtype), v_old.astype(dtype), old_mask, k_new, v_new,
                                   new_mask_BxTxT, divisor)
        return out, (k_BxTxKxE, v_BxTxKxE)

    return attend


def _run_layers(params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, cache, old_mask_BxTxS, dtype, remat="none",
                attention_block=0, activation_sharding=None, taps=False, mlp_edit=None, x_in=None, layer_slice=None,
                fused_attention=None, activation_dtype=None, bf16_as_bits=False):
    """All blocks: hidden [B,T,D] before the final norm, new keys and values per layer, and (with
    `taps`) each layer's MLP hidden [L, B, T, F] and output [L, B, T, D]. `layer_slice=(start, stop)`
    runs only those layers, from `x_in` (layer `start`'s input) instead of the embedded tokens.
    `bf16_as_bits` (for XLA:CPU): the scan slices bf16 weights as their bit patterns
    (block.layers_as_bits)."""
    variants = layer_variants(cfg)
    layer_params = params["layers"]
    if layer_slice is not None:
        start, stop = layer_slice
        layer_params, variants = jax.tree.map(lambda a: a[start:stop], (layer_params, variants))
    inv_freq = rope_inv_freq(cfg)
    # Among the T new tokens: causal, same segment, real tokens only (blockwise attention builds
    # its tiles of this mask itself).
    tiled = cache is None and (attention_block or (fused_attention is not None and variants is None))
    seq_mask_BxTxT = None if tiled else sequence_mask(segment_ids_BxT)
    cached = None if cache is None else (cache["k"], cache["v"])
    old_positions_BxS = None if cache is None or variants is None else cache["positions"]
    x_BxTxD = embed(params, cfg, tokens_BxT, activation_dtype or dtype) if x_in is None else x_in
    if activation_sharding is not None:
        # Pin the residual stream to the batch sharding: left to propagation, it takes the
        # embedding's layout (hidden over fsdp, rows replicated), so every device would keep every
        # row's activations for the backward pass.
        x_BxTxD = jax.lax.with_sharding_constraint(x_BxTxD, activation_sharding)
    edit_layer, delta_BxTxD = mlp_edit if mlp_edit is not None else (None, None)
    mixed = activation_dtype is not None and jnp.dtype(activation_dtype) != jnp.dtype(dtype)

    def scan_body(x, inputs):
        p, layer_cache, variant, layer = inputs
        p = layer_from_bits(p)
        attend = _attend_fn(cfg, dtype, positions_BxT, segment_ids_BxT, seq_mask_BxTxT, attention_block, layer_cache,
                            old_mask_BxTxS, old_positions_BxS, None if variant is None else variant["window"],
                            fused_attention, dtype if mixed else None)
        delta = None if delta_BxTxD is None else jnp.where(layer == edit_layer, delta_BxTxD, 0)
        x, (k, v), mlp_in = block(p, cfg, x, positions_BxT, inv_freq if variant is None else variant["inv_freq"],
                                  attend, dtype=dtype, mlp_delta_BxTxD=delta)
        if activation_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, activation_sharding)
        return x, ((k, v), (mlp_in, x) if taps else None)

    if remat != "none":
        # prevent_cse=False: inside a scan the recomputation cannot be merged away anyway.
        scan_body = jax.checkpoint(scan_body, policy=remat_policy(remat), prevent_cse=False)

    layer_ids = None if mlp_edit is None else jnp.arange(*(layer_slice or (0, cfg.num_layers)))
    x_BxTxD, ((new_k, new_v), tapped) = jax.lax.scan(scan_body, x_BxTxD,
                                                    (layers_as_bits(layer_params, bf16_as_bits), cached, variants,
                                                     layer_ids))
    return x_BxTxD, new_k, new_v, tapped


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
    fused_attention=None,
    activation_dtype=None,
) -> tuple[jax.Array, Cache | None]:
    """Final-norm hidden states [B, T, D] (apply `lm_logits` for logits) and the updated cache.

    Without a cache: full-sequence attention with causal + same-segment masking (padding = segment 0).
    With a cache: the T new tokens attend to every valid cached slot and causally to each other,
    and are then written at slots [end, end+T) of every row. `remat` (see REMAT_POLICIES) only
    matters under differentiation; `attention_block` > 0 computes the cache-less attention block
    by block (`blockwise_attention`), for long sequences; `activation_sharding` (a sharding of
    [B, T, D]) pins the residual stream's layout between blocks; `fused_attention` (a
    models.flash_attention.FusedAttention) replaces both cache-less attentions in layers without
    a sliding window. `activation_dtype` (default `dtype`) is the dtype of the residual stream and
    of all elementwise work, with only the matmuls' operands in `dtype`: f32 around bf16 matmuls
    suits CPUs, which have bf16 matmul units but no bf16 elementwise arithmetic (only in the
    cache-less call; `prefill` and `extend` take it too).
    """
    if cache is None:
        x_BxTxD, _, _, _ = _run_layers(params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, None, None, dtype,
                                       remat, attention_block, activation_sharding, fused_attention=fused_attention,
                                       activation_dtype=activation_dtype)
        return norm(x_BxTxD, params["final_norm"], cfg), None
    is_real_BxT = segment_ids_BxT != 0
    # Cached slots all precede the new tokens: a real query sees every valid one.
    old_mask_BxTxS = is_real_BxT[:, :, None] & cache["valid"][:, None, :]
    x_BxTxD, new_k, new_v, _ = _run_layers(params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, cache,
                                           old_mask_BxTxS, dtype)
    end = cache["end"]
    # The cache is only read inside the layers and written here once, in place.
    return norm(x_BxTxD, params["final_norm"], cfg), _filled(cache, new_k, new_v, is_real_BxT, positions_BxT, end)


def forward_with_taps(params: Params, cfg: ModelConfig, tokens_BxT, segment_ids_BxT, *, mlp_edit=None,
                      dtype=jnp.float32):
    """Logits [B, T, V] of right-padded or packed rows (positions restart at each segment) and, per
    layer, the MLP's hidden (the down projection's input) `mlp_in` [L, B, T, F] and the residual
    stream after the layer `resid_out` [L, B, T, D]. `mlp_edit=(layer, delta_BxTxD)` adds `delta`
    to that layer's MLP output (the down projection's, before any post-MLP norm); `layer` may be traced."""
    x_BxTxD, _, _, (mlp_in, resid_out) = _run_layers(
        params, cfg, tokens_BxT, segment_positions(segment_ids_BxT), segment_ids_BxT, None, None, dtype, taps=True,
        mlp_edit=mlp_edit,
    )
    logits = lm_logits(params, cfg, norm(x_BxTxD, params["final_norm"], cfg), dtype=dtype)
    return logits, {"mlp_in": mlp_in, "resid_out": resid_out}


def run_layer_range(params: Params, cfg: ModelConfig, x_BxTxD, segment_ids_BxT, start: int, stop: int, *,
                    taps=False, mlp_edit=None, dtype=jnp.float32):
    """The residual stream after layers start..stop-1 given layer `start`'s input (`embed` for layer 0):
    the model in pieces, so a change to one layer's output reruns only the layers above it. With
    `taps`, also those layers' `mlp_in` [stop-start, B, T, F] and `resid_out` [stop-start, B, T, D];
    `mlp_edit` as in `forward_with_taps` (the layer numbered in the whole model)."""
    x_BxTxD, _, _, tapped = _run_layers(params, cfg, None, segment_positions(segment_ids_BxT), segment_ids_BxT, None,
                                        None, dtype, taps=taps, mlp_edit=mlp_edit, x_in=x_BxTxD.astype(dtype),
                                        layer_slice=(start, stop))
    if not taps:
        return x_BxTxD
    return x_BxTxD, {"mlp_in": tapped[0], "resid_out": tapped[1]}


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
    activation_dtype=None,
    bf16_as_bits=False,
) -> tuple[jax.Array, Cache]:
    """Forward a (right-padded) batch of prompts and return a cache of `slots` slots holding them
    (`activation_dtype` as in `forward`, `bf16_as_bits` as in `_run_layers`)."""
    x_BxTxD, new_k, new_v, _ = _run_layers(params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, None, None, dtype,
                                           activation_dtype=activation_dtype, bf16_as_bits=bf16_as_bits)
    B, T = tokens_BxT.shape
    cache = init_cache(cfg, B, slots, cache_dtype or dtype)
    zero = jnp.zeros((), jnp.int32)
    return norm(x_BxTxD, params["final_norm"], cfg), _filled(cache, new_k, new_v, segment_ids_BxT != 0,
                                                             positions_BxT, zero)


def extend(params: Params, cfg: ModelConfig, cache_k, cache_v, cache_lens_B, tokens_BxT, segment_ids_BxT, *,
           dtype=jnp.float32, activation_dtype=None, bf16_as_bits=False):
    """Forward right-padded tokens that continue rows whose first `cache_lens_B` tokens are already in
    slots [0, cache_lens) of `cache_k`, `cache_v` [L, B, S, K, E] (a `prefill`'s keys and values,
    positions = slots). Returns final-norm hidden [B, T, D] and the new tokens' keys and values
    [L, B, T, K, E]: what `prefill` of the whole rows gives for these tokens (`activation_dtype` as
    in `forward`, `bf16_as_bits` as in `_run_layers`)."""
    slots_S = jnp.arange(cache_k.shape[2])
    is_real_BxT = segment_ids_BxT != 0
    positions_BxT = (cache_lens_B[:, None] + jnp.arange(tokens_BxT.shape[1])[None, :]) * is_real_BxT
    cache = {"k": cache_k, "v": cache_v}
    if cfg.has_sliding_layers:
        cache["positions"] = jnp.broadcast_to(slots_S[None, :], (tokens_BxT.shape[0], slots_S.shape[0]))
    old_mask_BxTxS = is_real_BxT[:, :, None] & (slots_S[None, :] < cache_lens_B[:, None])[:, None, :]
    x_BxTxD, new_k, new_v, _ = _run_layers(params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, cache,
                                           old_mask_BxTxS, dtype, activation_dtype=activation_dtype,
                                           bf16_as_bits=bf16_as_bits)
    return norm(x_BxTxD, params["final_norm"], cfg), new_k, new_v


def _filled(cache: Cache, new_k, new_v, is_real_BxT, positions_BxT, end) -> Cache:
    """The cache with T new tokens written at slots [end, end + T)."""
    out = {
        "k": _write_slots(cache["k"], new_k, end),
        "v": _write_slots(cache["v"], new_v, end),
        "valid": jax.lax.dynamic_update_slice(cache["valid"], is_real_BxT, (0, end)),
        "end": end + is_real_BxT.shape[1],
    }
    if "positions" in cache:
        out["positions"] = jax.lax.dynamic_update_slice(cache["positions"], positions_BxT.astype(jnp.int32), (0, end))
    return out


def _write_slots(cache_kv, new_kv, end):
    return jax.lax.dynamic_update_slice(cache_kv, new_kv.astype(cache_kv.dtype), (0, 0, end, 0, 0))


def lm_logits(params: Params, cfg: ModelConfig, hidden_xD: jax.Array, *, dtype=jnp.float32) -> jax.Array:
    """Vocabulary logits (f32) for any leading shape of hidden states."""
    if cfg.tie_word_embeddings:
        logits = jnp.einsum("...d,vd->...v", hidden_xD.astype(dtype), params["embed"].astype(dtype),
                            preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("...d,dv->...v", hidden_xD.astype(dtype), params["lm_head"].astype(dtype),
                            preferred_element_type=jnp.float32)
    if cfg.final_logit_softcap:
        logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> Cache:
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    cache = {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "valid": jnp.zeros((batch, slots), bool),
        "end": jnp.zeros((), jnp.int32),
    }
    if cfg.has_sliding_layers:
        cache["positions"] = jnp.zeros((batch, slots), jnp.int32)
    return cache


def segment_positions(segment_ids_BxT: jax.Array) -> jax.Array:
    """Positions 0.. within each segment of a packed row; pads get 0."""
    T = segment_ids_BxT.shape[1]
    idx_T = jnp.arange(T)
    starts = jnp.concatenate([jnp.ones_like(segment_ids_BxT[:, :1], bool),
                              segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    start_BxT = jax.lax.cummax(jnp.where(starts, idx_T, 0), axis=1)
    return (idx_T - start_BxT) * (segment_ids_BxT != 0)


def padded_positions(segment_ids_BxT: jax.Array) -> jax.Array:
    """Positions 0.. along each row's real tokens (right padding); pads get 0."""
    real = (segment_ids_BxT != 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0) * real

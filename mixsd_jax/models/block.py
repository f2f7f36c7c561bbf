"""One decoder block, shared by training, prefill and the decode engine.

What differs between those callers is only how a block attends (dense over the sequence, blockwise
for long rows, against a KV cache, or the engine's live-length walk over a shared cache), so the
block takes that as a function: `attend(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE) -> (out_BxTxHE, kv)`,
where `kv` is whatever the caller wants back per layer (the keys and values to cache). Everything
else — norms, projections, q/k bias and norms, RoPE, the MLP — is written once, here.

Dimension letters: B batch, T tokens, D hidden, H query heads, K kv heads, E head dim, F ffn.
Linear weights are stored [in, out].
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mixsd_jax.models.config import ModelConfig, SLIDING
from mixsd_jax.models.matmul import from_bits, past_slow_rows, to_words, weight_matmul


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # As transformers' Llama: normalise in f32, cast back, then scale.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def norm(x: jax.Array, weight: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The model's RMSNorm. Gemma stores its weights as an offset from 1 and scales in f32 before
    casting back (transformers' Gemma3RMSNorm); the offset is applied here, not at load, so weights
    round-trip unchanged and a bf16 copy keeps the small offsets' precision."""
    if not cfg.norm_offset:
        return rms_norm(x, weight, cfg.rms_norm_eps)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def _inv_freq(theta: float, head_dim: int) -> np.ndarray:
    # As transformers computes them, each step rounded to float32 (the exponent, theta to that
    # power, its reciprocal), and on the host, so that every jitted function gets this same
    # constant. Traced, XLA folds 1/theta**x into one correctly rounded step instead, which differs
    # from transformers' table in the last bit at about a third of the entries; a frequency's last
    # bit moves the angle at position p by p times as much, so past a few hundred tokens the
    # logits drift from the reference by far more than float32 round-off.
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    power = np.power(np.float64(np.float32(theta)), exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE frequencies (float32, a host constant) of the full-attention layers (every layer, for
    most models)."""
    inv_freq = _inv_freq(cfg.rope_theta, cfg.head_dim)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / np.float32(s.factor)
    # llama3: long wavelengths slowed by `factor`, short kept, a smooth blend in between; float32
    # arithmetic throughout (numpy keeps float32 against Python scalars), as transformers'.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(s.factor), inv_freq)
    smooth = (np.float32(s.original_max_position_embeddings) / wavelen - np.float32(s.low_freq_factor)) / np.float32(
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, blended, scaled).astype(np.float32)


def layer_variants(cfg: ModelConfig) -> dict | None:
    """Per-layer RoPE frequencies [L, E/2] and attention windows [L] of a model with sliding-window
    layers (host arrays, scanned with the layer weights), or None when every layer is the same."""
    from mixsd_jax.models.attention import NO_WINDOW

    if not cfg.has_sliding_layers:
        return None
    sliding = np.asarray([t == SLIDING for t in cfg.layer_types])
    local, full = _inv_freq(cfg.local_rope_theta, cfg.head_dim), rope_inv_freq(cfg)
    return {
        "inv_freq": np.where(sliding[:, None], local[None], full[None]),
        "window": np.where(sliding, cfg.sliding_window, NO_WINDOW).astype(np.int32),
    }


def layers_as_bits(layers, as_bits: bool):
    """The stacked layer weights for a layer scan, bf16 ones as their bit patterns when `as_bits`.

    For XLA:CPU, which has no bf16 dynamic-slice: it converts every stacked bf16 weight to f32 once
    per call, then slices each layer's f32 copy and converts it back to bf16 (three times the
    traffic of the weights themselves at every step, and an f32 copy of the model in memory). A
    stack of bit patterns (pairs of bf16 as uint32 words, matmul.to_words) is sliced as it is. The
    scan body undoes it with `layer_from_bits`."""
    return jax.tree.map(to_words, layers) if as_bits else layers


def layer_from_bits(p):
    """One layer's weights from `layers_as_bits` (unchanged when they were not bits)."""
    return jax.tree.map(lambda a: from_bits(a, jnp.bfloat16), p)


def apply_rope(x_BxTxNxE: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    # Half-split rotation (transformers' rotate_half), angles in f32.
    angles_BxTxE2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BxTxE2)[:, :, None, :]
    sin = jnp.sin(angles_BxTxE2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxNxE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxE.dtype)


def linear(x, w, dtype):
    # As one 2-D matmul over the flattened leading dims, whose backward pass stays on XLA:CPU's
    # fast matmul path (models.matmul): through "...i,io->...o" on [B, T, in] the weight gradient
    # would contract two dims at once, and a plain jnp.dot's gradient contracts over rows. The
    # operands are cast to `dtype`; the result keeps x's dtype (f32 activations around bf16
    # matmuls, see transformer.forward's `activation_dtype`). Past XLA:CPU's slow row counts
    # (matmul.past_slow_rows: a MixSD decode step of 32 records has 64 rows).
    y = past_slow_rows(lambda a: weight_matmul(a, w, dtype, x.dtype), x.reshape(-1, x.shape[-1]), dtype)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def embed(params, cfg: ModelConfig, tokens, dtype) -> jax.Array:
    # Rows gathered from the master table, then cast: the gradient is a scatter into the table's
    # own dtype, not into a `dtype` copy of the whole table.
    x = params["embed"][tokens].astype(dtype)
    if cfg.scale_embeddings:  # in the compute dtype, as transformers' Gemma3TextScaledWordEmbedding
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
    return x


def qkv(p, cfg: ModelConfig, h_BxTxD, positions_BxT, inv_freq, dtype):
    """Queries [B, T, H, E], keys and values [B, T, K, E] of normed hidden states, RoPE applied."""
    B, T, _ = h_BxTxD.shape
    q, k, v = linear(h_BxTxD, p["wq"], dtype), linear(h_BxTxD, p["wk"], dtype), linear(h_BxTxD, p["wv"], dtype)
    if cfg.qkv_bias:
        q, k, v = q + p["bq"].astype(dtype), k + p["bk"].astype(dtype), v + p["bv"].astype(dtype)
    q_BxTxHxE = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
    k_BxTxKxE = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v_BxTxKxE = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q_BxTxHxE = norm(q_BxTxHxE, p["q_norm"], cfg)
        k_BxTxKxE = norm(k_BxTxKxE, p["k_norm"], cfg)
    return apply_rope(q_BxTxHxE, positions_BxT, inv_freq), apply_rope(k_BxTxKxE, positions_BxT, inv_freq), v_BxTxKxE


def mlp_hidden(p, cfg: ModelConfig, h_BxTxD, dtype) -> jax.Array:
    """act(gate) * up [B, T, F]: the input of the down projection (MEMIT's "keys")."""
    gate = linear(h_BxTxD, p["w_gate"], dtype)
    act = jax.nn.silu(gate) if cfg.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)
    return act * linear(h_BxTxD, p["w_up"], dtype)


def block(p, cfg: ModelConfig, x_BxTxD, positions_BxT, inv_freq, attend: Callable, *, dtype,
          mlp_delta_BxTxD=None):
    """One decoder block: (new hidden [B, T, D], attend's kv, the MLP's hidden [B, T, F]).

    `mlp_delta_BxTxD`, if given, is added to the MLP's output, the down projection's (before Gemma's
    post-MLP norm, as a forward hook on transformers' `mlp` module adds it)."""
    h = norm(x_BxTxD, p["attn_norm"], cfg)
    q_BxTxHxE, k_BxTxKxE, v_BxTxKxE = qkv(p, cfg, h, positions_BxT, inv_freq, dtype)
    attn_BxTxHE, kv = attend(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE)
    out = linear(attn_BxTxHE, p["wo"], dtype)
    if cfg.sandwich_norms:
        out = norm(out, p["post_attn_norm"], cfg)
    x_BxTxD = x_BxTxD + out
    mlp_in_BxTxF = mlp_hidden(p, cfg, norm(x_BxTxD, p["mlp_norm"], cfg), dtype)
    out = linear(mlp_in_BxTxF, p["w_down"], dtype)
    if mlp_delta_BxTxD is not None:
        out = out + mlp_delta_BxTxD.astype(out.dtype)
    if cfg.sandwich_norms:
        out = norm(out, p["post_mlp_norm"], cfg)
    return x_BxTxD + out, kv, mlp_in_BxTxF

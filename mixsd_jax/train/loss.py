"""Token losses over the LM head, dense or chunked so `[tokens, vocab]` never exists at once.

Each loss maps final-norm hidden states [N, D], targets [N] and a mask [N] to sums over the
tokens: (masked NLL sum, (mask count, correct count)). The train step divides the sums by the
global token count, so a chunked loss is the same function of the parameters as the dense one,
only summed in a different order (f32 round-off).

Chunked: the N tokens are cut into chunks of `chunk` rows and a `lax.scan` forms one chunk's
[chunk, V] logits at a time. The scan body is rematerialised (`jax.checkpoint`), so the backward
pass recomputes a chunk's logits from its [chunk, D] hidden states instead of keeping all N x V
of them: peak memory is one chunk's logits and their gradient, whatever the sequence length, and
the matmul count is the same as a dense backward that recomputes nothing (the logits' gradient
needs the softmax, which the dense version keeps as an N x V residual instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixsd_jax.models.config import ModelConfig

# Auto-chunking threshold on tokens x vocab of a micro batch: above 2^27 f32 logits (512 MiB, one
# Qwen3 row of ~880 tokens) the dense logits and their gradient dominate a step's memory.
AUTO_CHUNK_ELEMENTS = 1 << 27
DEFAULT_CHUNK = 1024


def head_weight(params, cfg: ModelConfig, dtype) -> tuple[jax.Array, str]:
    """The LM head as (weight, einsum spec hidden x weight -> logits): tied [V, D] or [D, V]."""
    if cfg.tie_word_embeddings:
        return params["embed"].astype(dtype), "nd,vd->nv"
    return params["lm_head"].astype(dtype), "nd,dv->nv"


def _sums(logits_NxV, targets_N, mask_N):
    # The target logit is picked with a compare against an iota (its gradient is an elementwise
    # one-hot that fuses into the softmax gradient, where take_along_axis would scatter into a
    # fresh [N, V] buffer); the max needed for a stable logsumexp doubles as the accuracy test.
    max_logit = jax.lax.stop_gradient(jnp.max(logits_NxV, axis=-1))
    log_z = max_logit + jnp.log(jnp.sum(jnp.exp(logits_NxV - max_logit[:, None]), axis=-1))
    is_target = jax.lax.broadcasted_iota(jnp.int32, logits_NxV.shape, 1) == targets_N[:, None]
    target_logit = jnp.sum(jnp.where(is_target, logits_NxV, 0.0), axis=-1)
    nll = jnp.sum((log_z - target_logit) * mask_N)
    correct = jnp.sum((target_logit >= max_logit) * mask_N)
    return nll, correct


def dense_nll_sums(hidden_NxD, weight, spec, targets_N, mask_N):
    logits_NxV = jnp.einsum(spec, hidden_NxD, weight, preferred_element_type=jnp.float32)
    nll, correct = _sums(logits_NxV, targets_N, mask_N)
    return nll, (jnp.sum(mask_N), correct)


def chunked_nll_sums(hidden_NxD, weight, spec, targets_N, mask_N, chunk: int):
    N, D = hidden_NxD.shape
    chunk = min(chunk, N)
    pad = -N % chunk
    if pad:  # padded rows carry mask 0: they add nothing to any sum
        hidden_NxD = jnp.pad(hidden_NxD, ((0, pad), (0, 0)))
        targets_N = jnp.pad(targets_N, (0, pad))
        mask_N = jnp.pad(mask_N, (0, pad))
    n = (N + pad) // chunk

    @jax.checkpoint
    def body(carry, xs):
        h_CxD, t_C, m_C = xs
        logits_CxV = jnp.einsum(spec, h_CxD, weight, preferred_element_type=jnp.float32)
        nll, correct = _sums(logits_CxV, t_C, m_C)
        return (carry[0] + nll, carry[1] + correct), None

    xs = (hidden_NxD.reshape(n, chunk, D), targets_N.reshape(n, chunk), mask_N.reshape(n, chunk))
    (nll, correct), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), xs)
    return nll, (jnp.sum(mask_N), correct)


def resolve_chunk(loss_chunk: int, tokens: int, vocab: int) -> int:
    """Chunk size in tokens for a micro batch: 0 = dense; -1 (auto) = DEFAULT_CHUNK when the
    dense logits would exceed AUTO_CHUNK_ELEMENTS, else dense; > 0 = that size."""
    if loss_chunk == -1:
        return DEFAULT_CHUNK if tokens * vocab > AUTO_CHUNK_ELEMENTS and tokens > DEFAULT_CHUNK else 0
    return 0 if loss_chunk >= tokens else loss_chunk


def nll_sums(params, cfg: ModelConfig, hidden_MxTxD, micro, compute_dtype, loss_chunk: int = -1):
    """(masked NLL sum, (mask count, correct count)) of a micro batch from its hidden states."""
    M, T, D = hidden_MxTxD.shape
    weight, spec = head_weight(params, cfg, compute_dtype)
    hidden_NxD = hidden_MxTxD.reshape(M * T, D).astype(compute_dtype)
    targets_N = micro["targets"].reshape(M * T)
    mask_N = micro["loss_mask"].reshape(M * T).astype(jnp.float32)
    chunk = resolve_chunk(loss_chunk, M * T, cfg.vocab_size)
    if chunk:
        return chunked_nll_sums(hidden_NxD, weight, spec, targets_N, mask_N, chunk)
    return dense_nll_sums(hidden_NxD, weight, spec, targets_N, mask_N)

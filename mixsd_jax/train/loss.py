"""Token losses over the LM head, dense or chunked so `[tokens, vocab]` never exists at once.

Each loss maps final-norm hidden states [M, T, D], targets [M, T] and a mask [M, T] to sums over
the tokens: (masked NLL sum, (mask count, correct count)). The train step divides the sums by the
global token count, so a chunked loss is the same function of the parameters as the dense one,
only summed in a different order (f32 round-off).

Chunked: the sequence is cut into chunks of `chunk` positions and a `lax.scan` forms one chunk's
[rows, chunk, V] logits at a time. The scan body is rematerialised (`jax.checkpoint`), so the backward
pass recomputes a chunk's logits from its [chunk, D] hidden states instead of keeping all N x V
of them: peak memory is one chunk's logits and their gradient, whatever the sequence length, and
the matmul count is the same as a dense backward that recomputes nothing (the logits' gradient
needs the softmax, which the dense version keeps as an N x V residual instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.matmul import weight_matmul

# Auto-chunking threshold on tokens x vocab of a micro batch: above 2^27 f32 logits (512 MiB, one
# Qwen3 row of ~880 tokens) the dense logits and their gradient dominate a step's memory.
AUTO_CHUNK_ELEMENTS = 1 << 27
DEFAULT_CHUNK = 1024


def head_weight(params, cfg: ModelConfig) -> tuple[jax.Array, bool]:
    """The LM head's master weight and whether it is stored [V, D] (tied to the embedding) or [D, V]."""
    if cfg.tie_word_embeddings:
        return params["embed"], True
    return params["lm_head"], False


def _logits(hidden_MxTxD, weight, vocab_major: bool):
    # Flattened to [M*T, D] first, one matmul whose gradients stay on XLA:CPU's fast matmul path
    # (models.matmul); f32 logits from the compute dtype's operands.
    M, T, D = hidden_MxTxD.shape
    logits_NxV = weight_matmul(hidden_MxTxD.reshape(M * T, D), weight, hidden_MxTxD.dtype, jnp.float32,
                               w_out_in=vocab_major)
    return logits_NxV.reshape(M, T, -1)


def _sums(logits_MxTxV, targets_MxT, mask_MxT):
    # The target logit is picked with a compare against an iota (its gradient is an elementwise
    # one-hot that fuses into the softmax gradient, where take_along_axis would scatter into a
    # fresh [M, T, V] buffer); the max needed for a stable logsumexp doubles as the accuracy test.
    max_logit = jax.lax.stop_gradient(jnp.max(logits_MxTxV, axis=-1))
    log_z = max_logit + jnp.log(jnp.sum(jnp.exp(logits_MxTxV - max_logit[..., None]), axis=-1))
    is_target = jax.lax.broadcasted_iota(jnp.int32, logits_MxTxV.shape, 2) == targets_MxT[..., None]
    target_logit = jnp.sum(jnp.where(is_target, logits_MxTxV, 0.0), axis=-1)
    nll = jnp.sum((log_z - target_logit) * mask_MxT)
    correct = jnp.sum((target_logit >= max_logit) * mask_MxT)
    return nll, correct


def dense_nll_sums(hidden_MxTxD, weight, vocab_major, targets_MxT, mask_MxT):
    logits_MxTxV = _logits(hidden_MxTxD, weight, vocab_major)
    nll, correct = _sums(logits_MxTxV, targets_MxT, mask_MxT)
    return nll, (jnp.sum(mask_MxT), correct)


def chunked_nll_sums(hidden_MxTxD, weight, vocab_major, targets_MxT, mask_MxT, chunk: int):
    """Chunks run along the sequence, all rows at once: the row axis keeps its sharding (rows
    over data x fsdp), so every device works on its own rows' chunk at each step."""
    M, T, D = hidden_MxTxD.shape
    chunk = min(chunk, T)
    pad = -T % chunk
    if pad:  # padded positions carry mask 0: they add nothing to any sum
        hidden_MxTxD = jnp.pad(hidden_MxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_MxT = jnp.pad(targets_MxT, ((0, 0), (0, pad)))
        mask_MxT = jnp.pad(mask_MxT, ((0, 0), (0, pad)))
    n = (T + pad) // chunk

    @jax.checkpoint
    def body(carry, xs):
        h_MxCxD, t_MxC, m_MxC = xs
        logits_MxCxV = _logits(h_MxCxD, weight, vocab_major)
        nll, correct = _sums(logits_MxCxV, t_MxC, m_MxC)
        return (carry[0] + nll, carry[1] + correct), None

    def steps(a):  # [M, n*C, ...] -> [n, M, C, ...]
        return jnp.moveaxis(a.reshape(M, n, chunk, *a.shape[2:]), 1, 0)

    xs = (steps(hidden_MxTxD), steps(targets_MxT), steps(mask_MxT))
    (nll, correct), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), xs)
    return nll, (jnp.sum(mask_MxT), correct)


def resolve_chunk(loss_chunk: int, rows: int, seq_len: int, vocab: int) -> int:
    """Positions per chunk (each chunk holds every row's positions [c*i, c*(i+1))): 0 = dense;
    -1 (auto) = DEFAULT_CHUNK when the dense logits would exceed AUTO_CHUNK_ELEMENTS, else dense;
    > 0 = that size."""
    if loss_chunk == -1:
        large = rows * seq_len * vocab > AUTO_CHUNK_ELEMENTS and seq_len > DEFAULT_CHUNK
        return DEFAULT_CHUNK if large else 0
    return 0 if loss_chunk >= seq_len else loss_chunk


def nll_sums(params, cfg: ModelConfig, hidden_MxTxD, micro, compute_dtype, loss_chunk: int = -1):
    """(masked NLL sum, (mask count, correct count)) of a micro batch from its hidden states."""
    M, T, _ = hidden_MxTxD.shape
    weight, vocab_major = head_weight(params, cfg)
    hidden_MxTxD = hidden_MxTxD.astype(compute_dtype)
    mask_MxT = micro["loss_mask"].astype(jnp.float32)
    chunk = resolve_chunk(loss_chunk, M, T, cfg.vocab_size)
    if chunk:
        return chunked_nll_sums(hidden_MxTxD, weight, vocab_major, micro["targets"], mask_MxT, chunk)
    return dense_nll_sums(hidden_MxTxD, weight, vocab_major, micro["targets"], mask_MxT)

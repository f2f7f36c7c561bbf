"""Multiple choice with a shared context: the context runs once and fills a KV cache that each
choice's continuation then attends to (one compiled program per batch shape and choice count).

Batches are shaped as in `mc.py` (power-of-two windows and rows, one window size per batch) and
results come back whole to every process.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixsd_jax import multihost
from mixsd_jax.errors import MixsdError
from mixsd_jax.eval.mc_batches import MIN_ROW, MIN_WINDOW, TokenScores, pow2_at_least, shape_batches
from mixsd_jax.models import transformer
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.sharding import pad_rows, put_batch


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def shared_context_logprobs(params, context_BxT, context_segments_BxT, choices_BxKxC, choice_segments_BxKxC, *,
                            cfg: ModelConfig, dtype: str):
    """Log-prob and argmax-hit of every token of K continuations of each row's context, the context
    run once: it fills a KV cache that each continuation then attends to. Token 0 of a continuation
    is predicted from the context's last position, token j from the continuation's token j-1."""
    compute = jnp.dtype(dtype)
    B, T = context_BxT.shape
    C = choices_BxKxC.shape[2]
    hidden_BxTxD, cache = transformer.prefill(params, cfg, context_BxT, transformer.padded_positions(context_segments_BxT),
                                     context_segments_BxT, T + C, dtype=compute)
    context_len_B = jnp.sum(context_segments_BxT != 0, axis=1)
    last_Bx1xD = jnp.take_along_axis(hidden_BxTxD, (context_len_B - 1)[:, None, None], axis=1)
    positions_BxC = context_len_B[:, None] + jnp.arange(C)[None]

    def one_choice(_, choice):
        tokens_BxC, segments_BxC = choice
        # The new cache is discarded: XLA drops the write, every choice reads the context's cache.
        hidden_BxCxD, _ = transformer.forward(params, cfg, tokens_BxC, positions_BxC * (segments_BxC != 0),
                                              segments_BxC, cache, dtype=compute)
        predicting_BxCxD = jnp.concatenate([last_Bx1xD, hidden_BxCxD[:, :-1]], axis=1)
        logits_BxCxV = transformer.lm_logits(params, cfg, predicting_BxCxD, dtype=compute)
        logprobs_BxCxV = jax.nn.log_softmax(logits_BxCxV, axis=-1)
        target_BxC = jnp.take_along_axis(logprobs_BxCxV, tokens_BxC[..., None], axis=-1)[..., 0]
        return None, (target_BxC, jnp.argmax(logits_BxCxV, axis=-1) == tokens_BxC)

    _, (target_KxBxC, greedy_KxBxC) = jax.lax.scan(
        one_choice, None, (jnp.swapaxes(choices_BxKxC, 0, 1), jnp.swapaxes(choice_segments_BxKxC, 0, 1))
    )
    return jnp.swapaxes(target_KxBxC, 0, 1), jnp.swapaxes(greedy_KxBxC, 0, 1)


@dataclasses.dataclass(frozen=True)
class ContextGroup:
    """One context and the continuations scored after it (a multiple-choice question)."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


def _fit_group(group: ContextGroup, max_length: int) -> ContextGroup:
    """Drop leading context tokens so the longest continuation's input fits in `max_length`."""
    excess = len(group.context) + max(len(c) for c in group.continuations) - 1 - max_length
    if excess <= 0:
        return group
    if excess >= len(group.context):
        raise MixsdError(f"a continuation does not fit in max_length {max_length} after its context")
    return ContextGroup(group.context[excess:], group.continuations)


def score_groups(
    params,
    cfg: ModelConfig,
    groups: Sequence[ContextGroup],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: str = "float32",
    mesh=None,
    progress: Callable[[int], None] | None = None,
) -> list[list[TokenScores]]:
    """Per-token scores of every continuation of every group, in input order."""
    max_length = max_length or cfg.max_position_embeddings
    groups = [_fit_group(g, max_length) for g in groups]
    K = max(len(g.continuations) for g in groups)  # one choice count per call: fewer compiled shapes
    results: list[list[TokenScores] | None] = [None] * len(groups)
    sizes = [(pow2_at_least(max(len(c) for c in g.continuations), MIN_WINDOW), len(g.context)) for g in groups]
    for chunk, padded_rows in shape_batches(sizes, batch_size):
        padded_rows = pad_rows(padded_rows, mesh)
        width = pow2_at_least(max(len(groups[i].context) for i in chunk), MIN_ROW)
        span = sizes[chunk[0]][0]
        context = np.zeros((padded_rows, width), np.int32)
        context_seg = np.zeros((padded_rows, width), np.int32)
        context_seg[:, 0] = 1  # empty slots get a one-token dummy context
        choices = np.zeros((padded_rows, K, span), np.int32)
        choice_seg = np.zeros((padded_rows, K, span), np.int32)
        for b, i in enumerate(chunk):
            g = groups[i]
            context[b, : len(g.context)] = g.context
            context_seg[b, : len(g.context)] = 1
            for k, c in enumerate(g.continuations):
                choices[b, k, : len(c)] = c
                choice_seg[b, k, : len(c)] = 1
        logprobs, greedy = multihost.fetch(shared_context_logprobs(
            params, put_batch(context, mesh), put_batch(context_seg, mesh), put_batch(choices, mesh),
            put_batch(choice_seg, mesh), cfg=cfg, dtype=dtype,
        ))
        for b, i in enumerate(chunk):
            results[i] = [
                TokenScores(logprobs[b, k, : len(c)].astype(np.float64), greedy[b, k, : len(c)].copy())
                for k, c in enumerate(groups[i].continuations)
            ]
        if progress is not None:
            progress(sum(len(groups[i].continuations) for i in chunk))
    return results  # type: ignore[return-value]

"""Log-likelihood scoring: log P(continuation | context) for many requests, and multiple choice.

One jitted kernel does all the work: a right-padded batch of token rows goes through the model, the
hidden states of a *window* of positions per row (where the scored tokens are predicted) are
gathered, and only there are vocabulary logits formed. The window keeps the [B, C, V] logits small
(C is the longest scored span of the batch, not the row length). The kernel returns each window
position's log-probability of its target token and whether that token was the argmax.

Host side: row and window lengths are rounded up to powers of two, and a batch only holds rows of one
window size (longest rows first), its row count rounded up to a power of two. On a CPU the kernel is
compute-bound, so padding every row to the benchmark's longest continuation would cost several times
the useful work; these few shape buckets keep the padding small and the compiled kernels few.

Multiple choice follows lm-evaluation-harness: the context and the continuation are tokenized
together and split where the context's own tokens end (trailing spaces of the context move to the
continuation); an empty context is replaced by the bos (else eos) token; a row longer than
`max_length` loses tokens from the left. `acc` picks the choice of highest total log-likelihood,
`acc_norm` the highest log-likelihood per character of the choice text (without the space that
joins it to the context).

With a `mesh`, each batch is split over data x fsdp (its row count rounded up to whole rows per
shard) and the parameters are wherever their sharding rules put them; results come back whole to
every process (`multihost.fetch`), so a multi-host run scores the same rows as one process.
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
from mixsd_jax.models import transformer
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.eval.mc_batches import MIN_ROW, MIN_WINDOW, TokenScores, pow2_at_least, shape_batches
from mixsd_jax.eval.mc_groups import ContextGroup, score_groups
from mixsd_jax.models.sharding import pad_rows, put_batch

@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def window_logprobs(params, tokens_BxT, segment_ids_BxT, window_start_B, targets_BxC, *, cfg: ModelConfig, dtype: str):
    """Log-prob of `targets_BxC[b, c]` predicted at input position `window_start_B[b] + c`, and
    whether it was the argmax. Positions past a row's end are clipped (the host masks them)."""
    compute = jnp.dtype(dtype)
    positions_BxT = transformer.padded_positions(segment_ids_BxT)
    hidden_BxTxD, _ = transformer.forward(params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, dtype=compute)
    T, C = tokens_BxT.shape[1], targets_BxC.shape[1]
    index_BxC = jnp.minimum(window_start_B[:, None] + jnp.arange(C)[None], T - 1)
    hidden_BxCxD = jnp.take_along_axis(hidden_BxTxD, index_BxC[..., None], axis=1)
    logits_BxCxV = transformer.lm_logits(params, cfg, hidden_BxCxD, dtype=compute)
    logprobs_BxCxV = jax.nn.log_softmax(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logprobs_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    greedy_BxC = jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC
    return target_BxC, greedy_BxC


@dataclasses.dataclass(frozen=True)
class ScoreRow:
    """A token sequence whose tokens `ids[score_from:]` are scored, each given all tokens before it."""

    ids: tuple[int, ...]
    score_from: int

    def __post_init__(self):
        if not 1 <= self.score_from < len(self.ids):
            raise MixsdError(f"score row: score_from {self.score_from} outside 1..{len(self.ids) - 1}")


def truncate_left(row: ScoreRow, max_length: int) -> ScoreRow:
    """Drop leading tokens so that the model input (all ids but the last) fits in `max_length`."""
    excess = len(row.ids) - 1 - max_length
    if excess <= 0:
        return row
    if row.score_from - excess < 1:
        raise MixsdError(
            f"a scored span of {len(row.ids) - row.score_from} tokens does not fit in max_length {max_length}"
        )
    return ScoreRow(row.ids[excess:], row.score_from - excess)


def _pack(rows: Sequence[ScoreRow], batch_size: int) -> dict[str, np.ndarray]:
    width = pow2_at_least(max(len(r.ids) - 1 for r in rows), MIN_ROW)
    window = pow2_at_least(max(len(r.ids) - r.score_from for r in rows), MIN_WINDOW)
    tokens = np.zeros((batch_size, width), np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    starts = np.zeros((batch_size,), np.int32)
    targets = np.zeros((batch_size, window), np.int32)
    for b, row in enumerate(rows):
        inputs, scored = row.ids[:-1], row.ids[row.score_from :]
        tokens[b, : len(inputs)] = inputs
        segments[b, : len(inputs)] = 1
        starts[b] = row.score_from - 1
        targets[b, : len(scored)] = scored
    return {"tokens": tokens, "segments": segments, "starts": starts, "targets": targets}


def score_rows(
    params,
    cfg: ModelConfig,
    rows: Sequence[ScoreRow],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: str = "float32",
    mesh=None,
    progress: Callable[[int], None] | None = None,
) -> list[TokenScores]:
    """Per-token log-probs of every row's scored tokens, in input order."""
    max_length = max_length or cfg.max_position_embeddings
    rows = [truncate_left(r, max_length) for r in rows]
    results: list[TokenScores | None] = [None] * len(rows)
    sizes = [(pow2_at_least(len(r.ids) - r.score_from, MIN_WINDOW), len(r.ids)) for r in rows]
    for chunk, padded_rows in shape_batches(sizes, batch_size):
        batch = _pack([rows[i] for i in chunk], pad_rows(padded_rows, mesh))
        logprobs, greedy = multihost.fetch(window_logprobs(
            params,
            put_batch(batch["tokens"], mesh),
            put_batch(batch["segments"], mesh),
            put_batch(batch["starts"], mesh),
            put_batch(batch["targets"], mesh),
            cfg=cfg,
            dtype=dtype,
        ))
        for b, i in enumerate(chunk):
            n = len(rows[i].ids) - rows[i].score_from
            results[i] = TokenScores(logprobs[b, :n].astype(np.float64), greedy[b, :n].copy())
        if progress is not None:
            progress(len(chunk))
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True)
class Loglikelihood:
    logprob: float  # log P(continuation | context), summed over its tokens
    is_greedy: bool  # greedy decoding from the context would write the continuation
    num_tokens: int
    num_chars: int  # characters of the continuation without its joining space (lm-eval's acc_norm length)


def _prefix_token(tokenizer) -> int:
    hf = getattr(tokenizer, "hf", tokenizer)
    return int(hf.bos_token_id) if hf.bos_token_id is not None else int(hf.eos_token_id)


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    hf = getattr(tokenizer, "hf", tokenizer)
    if not texts:
        return []
    return [list(ids) for ids in hf(texts, add_special_tokens=False)["input_ids"]]


def _split_pair(context: str, continuation: str) -> tuple[str, str]:
    if not continuation:
        raise MixsdError(f"empty continuation for context {context[-40:]!r}")
    spaces = len(context) - len(context.rstrip())
    if spaces:  # lm-eval: trailing whitespace of the context belongs to the continuation
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    return context, continuation


def encode_pairs(tokenizer, requests: Sequence[tuple[str, str]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(context ids, continuation ids) per request, as lm-evaluation-harness encodes a pair: the
    context alone, and the continuation as the tail of the jointly encoded text past the context's
    token count. An empty context becomes the bos (else eos) token."""
    pairs = [_split_pair(c, x) for c, x in requests]
    contexts = sorted({c for c, _ in pairs if c})
    context_ids = dict(zip(contexts, _encode_many(tokenizer, contexts)))
    whole_ids = _encode_many(tokenizer, [c + x for c, x in pairs])
    out = []
    for (context, _), whole in zip(pairs, whole_ids):
        if context:
            ctx = context_ids[context]
            if len(ctx) >= len(whole):
                raise MixsdError(f"continuation after {context[-40:]!r} encodes to no tokens of its own")
            out.append((tuple(ctx), tuple(whole[len(ctx) :])))
        else:
            out.append(((_prefix_token(tokenizer),), tuple(whole)))
    return out


def encode_requests(tokenizer, requests: Sequence[tuple[str, str]]) -> list[ScoreRow]:
    """(context, continuation) pairs as score rows (context ids + continuation ids)."""
    return [ScoreRow(ctx + cont, len(ctx)) for ctx, cont in encode_pairs(tokenizer, requests)]


def _choice_chars(continuation: str) -> int:
    return len(continuation[1:] if continuation.startswith(" ") else continuation)


def loglikelihoods(
    params,
    cfg: ModelConfig,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: str = "float32",
    mesh=None,
    progress: Callable[[int], None] | None = None,
) -> list[Loglikelihood]:
    rows = encode_requests(tokenizer, requests)
    scores = score_rows(params, cfg, rows, batch_size=batch_size, max_length=max_length, dtype=dtype, mesh=mesh,
                        progress=progress)
    return [_loglikelihood(s, continuation) for s, (_, continuation) in zip(scores, requests)]


def _loglikelihood(scores: TokenScores, continuation: str) -> Loglikelihood:
    return Loglikelihood(float(scores.logprobs.sum()), bool(scores.greedy.all()), len(scores.logprobs),
                         _choice_chars(continuation))


# ----------------------------------------------------------------------------- multiple choice


def score_mc(
    params,
    cfg: ModelConfig,
    tokenizer,
    items: Sequence,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: str = "float32",
    mesh=None,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """One result per `MCItem`: per-choice log-likelihoods, predictions, and acc / acc_norm (0 or 1).

    Items whose choices share the context run it once (`score_groups`); items that share the
    continuation instead (WinoGrande) are scored as independent rows."""
    per_item: list[list[Loglikelihood] | None] = [None] * len(items)
    shared = [i for i, item in enumerate(items) if item.shared_continuation is None]
    if shared:
        groups = []
        for i in shared:
            pairs = encode_pairs(tokenizer, items[i].requests())
            groups.append(ContextGroup(pairs[0][0], tuple(cont for _, cont in pairs)))
        scores = score_groups(params, cfg, groups, batch_size=batch_size, max_length=max_length, dtype=dtype,
                              mesh=mesh, progress=progress)
        for i, item_scores in zip(shared, scores):
            per_item[i] = [_loglikelihood(s, cont) for s, (_, cont) in zip(item_scores, items[i].requests())]
    rest = [i for i, item in enumerate(items) if item.shared_continuation is not None]
    if rest:
        requests = [(i, r) for i in rest for r in items[i].requests()]
        scored = loglikelihoods(params, cfg, tokenizer, [r for _, r in requests], batch_size=batch_size,
                                max_length=max_length, dtype=dtype, mesh=mesh, progress=progress)
        for i in rest:
            per_item[i] = []
        for (i, _), ll in zip(requests, scored):
            per_item[i].append(ll)
    return [mc_result(item, lls) for item, lls in zip(items, per_item)]


def mc_result(item, lls: Sequence[Loglikelihood]) -> dict:
    logprobs = [ll.logprob for ll in lls]
    if item.shared_continuation is None:
        normalized = [ll.logprob / max(1, ll.num_chars) for ll in lls]
    else:  # every option scores the same continuation: per-character normalisation changes nothing
        normalized = logprobs
    pred, pred_norm = int(np.argmax(logprobs)), int(np.argmax(normalized))
    return {
        "id": item.id,
        "gold": item.gold,
        "logprobs": logprobs,
        "num_tokens": [ll.num_tokens for ll in lls],
        "pred": pred,
        "pred_norm": pred_norm,
        "acc": float(pred == item.gold),
        "acc_norm": float(pred_norm == item.gold),
    }


def mc_metrics(results: Sequence[dict]) -> dict:
    """Mean acc and acc_norm over items, each with a 95% Wilson interval."""
    from mixsd_jax.eval.intervals import wilson_interval

    n = len(results)
    out: dict = {"n": n}
    for key in ("acc", "acc_norm"):
        correct = int(sum(r[key] for r in results))
        out[key] = correct / n if n else None
        out[f"{key}_ci95"] = list(wilson_interval(correct, n))
    return out

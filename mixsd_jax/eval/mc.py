"""Log-likelihood scoring: log P(continuation | context) for many requests, and multiple choice.

One jitted kernel does all the work: a right-padded batch of token rows goes through the model, the
hidden states of a *window* of positions per row (where the scored tokens are predicted) are
gathered, and only there are vocabulary logits formed. The window keeps the [B, C, V] logits small
(C is the longest scored span of the batch, not the row length). The kernel returns each window
position's log-probability of its target token and whether that token was the argmax.

Host side: rows are sorted by length and cut into batches of a fixed size; row and window lengths are
rounded up to powers of two, so a whole benchmark compiles a handful of kernels.

Multiple choice follows lm-evaluation-harness: the context and the continuation are tokenized
together and split where the context's own tokens end (trailing spaces of the context move to the
continuation); an empty context is replaced by the bos (else eos) token; a row longer than
`max_length` loses tokens from the left. `acc` picks the choice of highest total log-likelihood,
`acc_norm` the highest log-likelihood per character of the choice text (without the space that
joins it to the context).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixsd_jax.errors import MixsdError
from mixsd_jax.models import transformer as tf
from mixsd_jax.models.config import ModelConfig

MIN_ROW = 32
MIN_WINDOW = 8


def pow2_at_least(n: int, floor: int) -> int:
    size = floor
    while size < n:
        size *= 2
    return size


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def window_logprobs(params, tokens_BxT, segment_ids_BxT, window_start_B, targets_BxC, *, cfg: ModelConfig, dtype: str):
    """Log-prob of `targets_BxC[b, c]` predicted at input position `window_start_B[b] + c`, and
    whether it was the argmax. Positions past a row's end are clipped (the host masks them)."""
    compute = jnp.dtype(dtype)
    positions_BxT = tf.padded_positions(segment_ids_BxT)
    hidden_BxTxD, _ = tf.forward(params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, dtype=compute)
    T, C = tokens_BxT.shape[1], targets_BxC.shape[1]
    index_BxC = jnp.minimum(window_start_B[:, None] + jnp.arange(C)[None], T - 1)
    hidden_BxCxD = jnp.take_along_axis(hidden_BxTxD, index_BxC[..., None], axis=1)
    logits_BxCxV = tf.lm_logits(params, cfg, hidden_BxCxD, dtype=compute)
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


@dataclasses.dataclass(frozen=True)
class TokenScores:
    logprobs: np.ndarray  # [n] log-prob of each scored token
    greedy: np.ndarray  # [n] the token was the model's argmax


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


def _batches(rows: Sequence[ScoreRow], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (longest first, so memory peaks early)."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].ids), i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


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
    progress: Callable[[int], None] | None = None,
) -> list[TokenScores]:
    """Per-token log-probs of every row's scored tokens, in input order."""
    max_length = max_length or cfg.max_position_embeddings
    rows = [truncate_left(r, max_length) for r in rows]
    results: list[TokenScores | None] = [None] * len(rows)
    for chunk in _batches(rows, batch_size):
        batch = _pack([rows[i] for i in chunk], batch_size)
        logprobs, greedy = window_logprobs(
            params,
            jnp.asarray(batch["tokens"]),
            jnp.asarray(batch["segments"]),
            jnp.asarray(batch["starts"]),
            jnp.asarray(batch["targets"]),
            cfg=cfg,
            dtype=dtype,
        )
        logprobs, greedy = np.asarray(logprobs), np.asarray(greedy)
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


def encode_requests(tokenizer, requests: Sequence[tuple[str, str]]) -> list[ScoreRow]:
    """(context, continuation) pairs as score rows, split as lm-evaluation-harness splits them."""
    contexts, wholes = [], []
    for context, continuation in requests:
        if not continuation:
            raise MixsdError(f"empty continuation for context {context[-40:]!r}")
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        contexts.append(context)
        wholes.append(context + continuation)
    context_ids = _encode_many(tokenizer, [c for c in contexts if c])
    whole_ids = _encode_many(tokenizer, wholes)
    rows, next_context = [], iter(context_ids)
    for context, whole in zip(contexts, whole_ids):
        if context:
            n = len(next(next_context))
            if n >= len(whole):
                raise MixsdError(f"continuation after {context[-40:]!r} encodes to no tokens of its own")
            rows.append(ScoreRow(tuple(whole), n))
        else:
            rows.append(ScoreRow((_prefix_token(tokenizer), *whole), 1))
    return rows


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
    progress: Callable[[int], None] | None = None,
) -> list[Loglikelihood]:
    rows = encode_requests(tokenizer, requests)
    scores = score_rows(params, cfg, rows, batch_size=batch_size, max_length=max_length, dtype=dtype, progress=progress)
    return [
        Loglikelihood(float(s.logprobs.sum()), bool(s.greedy.all()), len(s.logprobs), _choice_chars(continuation))
        for s, (_, continuation) in zip(scores, requests)
    ]


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
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """One result per `MCItem`: per-choice log-likelihoods, predictions, and acc / acc_norm (0 or 1)."""
    requests, owners = [], []
    for index, item in enumerate(items):
        for request in item.requests():
            requests.append(request)
            owners.append(index)
    scored = loglikelihoods(
        params, cfg, tokenizer, requests, batch_size=batch_size, max_length=max_length, dtype=dtype, progress=progress
    )
    per_item: list[list[Loglikelihood]] = [[] for _ in items]
    for owner, ll in zip(owners, scored):
        per_item[owner].append(ll)
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
    from mixsd_jax.eval.scoring import wilson_interval

    n = len(results)
    out: dict = {"n": n}
    for key in ("acc", "acc_norm"):
        correct = int(sum(r[key] for r in results))
        out[key] = correct / n if n else None
        out[f"{key}_ci95"] = list(wilson_interval(correct, n))
    return out

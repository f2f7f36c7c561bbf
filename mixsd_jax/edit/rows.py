"""Token rows for MEMIT: prompts in their context prefixes, the subject's last token, target labels.

Rows are right-padded into one [B, T] batch (T rounded up to a multiple of 16, so a handful of
shapes compile). A row's `lookup` is the index of the last token overlapping the subject's
characters, read from the tokenizer's offsets, so it holds whatever the template around the
subject looks like (MEMIT's own lookup assumes a space before the subject; the authors patched it
for chat prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixsd_jax.edit.requests import EditRequest

KL_PROMPT = " is a"  # MEMIT's "{} is a": the subject's next-token distribution is held near the base's
_ROUND = 16


@dataclass(frozen=True)
class Rows:
    tokens: np.ndarray  # [B, T] int32
    segment_ids: np.ndarray  # [B, T] int32, 1 = real token
    lookup: np.ndarray  # [B] the subject's last token
    request: np.ndarray  # [B] which request of the group the row belongs to
    labels: np.ndarray  # [B, T] next-token label at each position, -1 none
    context: np.ndarray  # [B] context index (0 = no prefix)


def _encode(tokenizer, text: str, subject_end: int, add_special: bool) -> tuple[list[int], int]:
    enc = tokenizer.hf(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    lookup = max(i for i, (start, end) in enumerate(offsets) if start < subject_end and end > start)
    return ids, lookup


def contexts(prompt_style: str, prefixes: tuple[str, ...]) -> tuple[str, ...]:
    """The prompt as is, then (plain prompts only) after each fixed prefix."""
    return ("",) if prompt_style == "chat" else ("", *prefixes)


def target_ids(tokenizer, request: EditRequest) -> list[int]:
    return list(tokenizer.hf.encode(request.target, add_special_tokens=False))


def build_rows(tokenizer, requests: list[EditRequest], ctxs: tuple[str, ...], *, with_targets: bool,
               add_special: bool) -> Rows:
    """Per request: one row per context (the prompt, plus the target's tokens but the last when
    `with_targets`)."""
    seqs, lookups, owners, labels, ctx_ids = [], [], [], [], []
    for r, request in enumerate(requests):
        target = target_ids(tokenizer, request) if with_targets else []
        for c, ctx in enumerate(ctxs):
            ids, lookup = _encode(tokenizer, ctx + request.text, len(ctx + request.prefix + request.subject),
                                  add_special)
            row_labels = [-1] * len(ids) + [-1] * max(len(target) - 1, 0)
            if target:
                # The logits at the last prompt token and at each target token but the last predict the target.
                row_labels[len(ids) - 1:len(ids) - 1 + len(target)] = target
            seqs.append(ids + target[:-1])
            labels.append(row_labels)
            lookups.append(lookup)
            owners.append(r)
            ctx_ids.append(c)
    return _pad(seqs, lookups, owners, labels, ctx_ids)


def kl_rows(tokenizer, requests: list[EditRequest]) -> Rows:
    """One "{subject} is a" row per request, in order (a batch of its own: these rows are short)."""
    seqs, lookups = [], []
    for request in requests:
        ids, lookup = _encode(tokenizer, request.subject + KL_PROMPT, len(request.subject), True)
        seqs.append(ids)
        lookups.append(lookup)
    n = len(requests)
    return _pad(seqs, lookups, list(range(n)), [[-1] * len(s) for s in seqs], [0] * n)


def _pad(seqs, lookups, owners, labels, ctx_ids) -> Rows:
    T = -(-max(len(s) for s in seqs) // _ROUND) * _ROUND
    B = len(seqs)
    tokens = np.zeros((B, T), np.int32)
    segment_ids = np.zeros((B, T), np.int32)
    label_arr = np.full((B, T), -1, np.int32)
    for b, (seq, lab) in enumerate(zip(seqs, labels)):
        tokens[b, :len(seq)] = seq
        segment_ids[b, :len(seq)] = 1
        label_arr[b, :len(lab)] = lab
    return Rows(tokens, segment_ids, np.asarray(lookups, np.int32), np.asarray(owners, np.int32), label_arr,
                np.asarray(ctx_ids, np.int32))


def group(rows: Rows, first: int, size: int, n_requests: int) -> Rows:
    """The rows of requests first..first+size-1, renumbered from 0; past the last request the last one
    again, so every group of a run has the same shapes (one compilation)."""
    ids = [min(first + i, n_requests - 1) for i in range(size)]
    idx = np.concatenate([np.nonzero(rows.request == r)[0] for r in ids])
    renumbered = np.concatenate([np.full(int((rows.request == r).sum()), i, np.int32) for i, r in enumerate(ids)])
    return Rows(rows.tokens[idx], rows.segment_ids[idx], rows.lookup[idx], renumbered, rows.labels[idx],
                rows.context[idx])


def up_to_subject(rows: Rows) -> Rows:
    """The rows cut after their subject token: nothing later can change a causal model's state there."""
    T = -(-(int(rows.lookup.max()) + 1) // _ROUND) * _ROUND
    keep = np.arange(T)[None, :] <= rows.lookup[:, None]
    return Rows(rows.tokens[:, :T] * keep, rows.segment_ids[:, :T] * keep, rows.lookup, rows.request,
                np.where(keep, rows.labels[:, :T], -1), rows.context)


def label_positions(rows: Rows, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the positions whose next token is labelled and those labels, padded to `width`
    (position 0, label -1): the loss needs the vocabulary logits there only."""
    positions = np.zeros((len(rows.labels), width), np.int32)
    labels = np.full((len(rows.labels), width), -1, np.int32)
    for b, row in enumerate(rows.labels):
        where = np.nonzero(row >= 0)[0]
        positions[b, :len(where)] = where
        labels[b, :len(where)] = row[where]
    return positions, labels

"""Why a tuned model forgot (or did not): the forgetting analyses of the paper, which the authors
describe but did not publish code for (docs/reference.md, Forgetting analyses), plus the error-analysis
buckets (docs/reference.md, Error analysis).

- Target NLL: per-token negative log-likelihood of a training file's targets under the *base*
  model's naive conditional p(y | x) (prompt = the chat-rendered user turn, no fact), tokenized as
  the trainer tokenizes them (assistant content and end-of-turn token). The paper's mechanism:
  MixSD targets are closer to what the base model would say, so fitting them moves it less.
- KL(base || tuned) of next-token distributions at every position of held-out prompts (chat-rendered
  user turns of the retention benchmarks), averaged over positions; also at the last position (the
  distribution of the reply's first token).
- Fisher-weighted displacement sum_i F_i (theta_i - theta0_i)^2, F the diagonal empirical Fisher of
  the base model on general text (LAMBADA passages): the mean over sequences of the squared gradient
  of the sequence's mean token log-likelihood. Reported with the plain squared L2 displacement and
  their ratio to mean(F) * L2 ("alignment": above 1 the update leans into Fisher-sensitive directions).
- Error categories: held-out wrong answers bucketed format / leakage / collapse / genuine, training-set
  (direct recall) wrong answers format / cross_entity / genuine (`error_analysis.py`).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixsd_jax import multihost
from mixsd_jax.errors import MixsdError
from mixsd_jax.eval.intervals import normal_mean_interval
from mixsd_jax.eval.mc import ScoreRow, score_rows
from mixsd_jax.eval.mc_batches import MIN_ROW, pow2_at_least
from mixsd_jax.models import transformer
from mixsd_jax.models.sharding import pad_rows, put_batch, put_replicated

NLL_BINS = np.linspace(0.0, 16.0, 65)
BOOTSTRAP_SAMPLES = 1000


# ----------------------------------------------------------------------------- target NLL


def target_rows(tokenizer, records: Sequence, max_length: int) -> list[ScoreRow]:
    """Each record as (prompt + target) ids whose target tokens are scored, as the trainer sees them."""
    from mixsd_jax.data.tokenize import tokenize_records

    data = tokenize_records(tokenizer, records, max_seq_len=max_length + 1, overlong="truncate")
    if len(data.examples) != len(records):
        dropped = len(records) - len(data.examples)
        raise MixsdError(f"{dropped} records have no target tokens within {max_length} tokens")
    rows = []
    for example in data.examples:
        score_from = int(np.argmax(example.mask))
        rows.append(ScoreRow(tuple(int(t) for t in example.ids), score_from))
    return rows


def target_nll(
    params, cfg, tokenizer, records: Sequence, *, name: str, batch_size: int = 8, dtype: str = "float32",
    mesh=None, progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """One row per record: its user text (for pairing files) and the NLL of every target token."""
    rows = target_rows(tokenizer, records, cfg.max_position_embeddings)
    scores = score_rows(params, cfg, rows, batch_size=batch_size, dtype=dtype, mesh=mesh, progress=progress)
    return [
        {"id": f"{name}/{i}", "user": record.user, "nll": [round(-float(x), 5) for x in s.logprobs]}
        for i, (record, s) in enumerate(zip(records, scores))
    ]


def summarize_nll(rows: Sequence[dict], seed: int = 0) -> dict:
    """Token-weighted mean NLL with a bootstrap (over records) 95% interval, median, histogram."""
    if not rows:
        raise MixsdError("no records to summarise")
    per_record = [np.asarray(r["nll"], float) for r in rows]
    sums = np.array([x.sum() for x in per_record])
    counts = np.array([len(x) for x in per_record])
    tokens = np.concatenate(per_record)
    from mixsd_jax.eval.intervals import ratio_bootstrap_ci

    low, high = ratio_bootstrap_ci(sums, counts, seed=seed, n_resamples=BOOTSTRAP_SAMPLES)
    hist, _ = np.histogram(np.clip(tokens, NLL_BINS[0], NLL_BINS[-1]), bins=NLL_BINS)
    return {
        "records": len(rows),
        "tokens": int(counts.sum()),
        "mean_token_nll": float(sums.sum() / counts.sum()),
        "ci95": [low, high],
        "mean_record_nll": float(np.mean(sums / counts)),
        "median_token_nll": float(np.median(tokens)),
        "mean_target_tokens": float(counts.mean()),
        "mean_record_total_nll": float(sums.mean()),  # longer targets can cost more in total
        "histogram": {"bins": NLL_BINS.tolist(), "counts": hist.tolist()},
    }


def common_rows(rows_by_name: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each file's rows restricted to the user texts every file has (a paired comparison)."""
    shared = set.intersection(*(set(r["user"] for r in rows) for rows in rows_by_name.values()))
    return {name: [r for r in rows if r["user"] in shared] for name, rows in rows_by_name.items()}


# ----------------------------------------------------------------------------- KL(base || tuned)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def kl_per_position(base_params, tuned_params, tokens_BxT, segment_ids_BxT, *, cfg, dtype: str):
    """KL(p_base || p_tuned) of the next-token distribution at every position [B, T]."""
    compute = jnp.dtype(dtype)
    positions = transformer.padded_positions(segment_ids_BxT)

    def logprobs(params):
        hidden, _ = transformer.forward(params, cfg, tokens_BxT, positions, segment_ids_BxT, dtype=compute)
        return jax.nn.log_softmax(transformer.lm_logits(params, cfg, hidden, dtype=compute), axis=-1)

    base, tuned = logprobs(base_params), logprobs(tuned_params)
    return jnp.sum(jnp.exp(base) * (base - tuned), axis=-1)


def kl_rows(
    base_params, tuned_params, cfg, token_rows: Sequence[Sequence[int]], ids: Sequence[str], *, batch_size: int = 8,
    dtype: str = "float32", mesh=None, progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Per text: mean KL over its positions and KL at its last position."""
    order = sorted(range(len(token_rows)), key=lambda i: -len(token_rows[i]))
    out: list[dict | None] = [None] * len(token_rows)
    rows = pad_rows(batch_size, mesh)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = pow2_at_least(max(len(token_rows[i]) for i in chunk), MIN_ROW)
        tokens = np.zeros((rows, width), np.int32)
        segments = np.zeros((rows, width), np.int32)
        for b, i in enumerate(chunk):
            tokens[b, : len(token_rows[i])] = token_rows[i]
            segments[b, : len(token_rows[i])] = 1
        kl = multihost.fetch(kl_per_position(base_params, tuned_params, put_batch(tokens, mesh),
                                             put_batch(segments, mesh), cfg=cfg, dtype=dtype))
        for b, i in enumerate(chunk):
            values = np.maximum(kl[b, : len(token_rows[i])], 0.0)  # float rounding can dip below 0
            out[i] = {"id": ids[i], "tokens": len(token_rows[i]), "kl_mean": float(values.mean()),
                      "kl_last": float(values[-1])}
        if progress is not None:
            progress(len(chunk))
    return out  # type: ignore[return-value]


def summarize_kl(rows: Sequence[dict]) -> dict:
    """Token-weighted mean KL and mean last-position KL, each with a normal-approximation 95% interval."""
    if not rows:
        raise MixsdError("no texts to summarise")
    weights = np.array([r["tokens"] for r in rows], float)
    means = np.array([r["kl_mean"] for r in rows])
    last = np.array([r["kl_last"] for r in rows])
    token_mean = float((means * weights).sum() / weights.sum())
    return {
        "texts": len(rows),
        "tokens": int(weights.sum()),
        "kl_token_mean": token_mean,
        "ci95": normal_mean_interval(means, token_mean),
        "kl_last_mean": float(last.mean()),
        "kl_last_ci95": normal_mean_interval(last, float(last.mean())),
    }


# ----------------------------------------------------------------------------- Fisher


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _squared_grad(params, tokens_1xT, segment_ids_1xT, *, cfg, dtype: str):
    """Squared gradient of the mean token log-likelihood of one sequence."""
    compute = jnp.dtype(dtype)
    positions = transformer.padded_positions(segment_ids_1xT)
    mask = (segment_ids_1xT[:, 1:] != 0).astype(jnp.float32)

    def mean_loglik(p):
        hidden, _ = transformer.forward(p, cfg, tokens_1xT, positions, segment_ids_1xT, dtype=compute)
        logprobs = jax.nn.log_softmax(transformer.lm_logits(p, cfg, hidden[:, :-1], dtype=compute), axis=-1)
        target = jnp.take_along_axis(logprobs, tokens_1xT[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(target * mask) / jnp.maximum(mask.sum(), 1.0)

    grads = jax.grad(mean_loglik)(params)
    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grads)


@jax.jit
def _accumulate(total, new):
    return jax.tree.map(jnp.add, total, new)


def diagonal_fisher(
    params, cfg, token_rows: Sequence[Sequence[int]], *, dtype: str = "float32", mesh=None,
    progress: Callable[[int], None] | None = None,
):
    """Diagonal empirical Fisher (a pytree like `params`) from per-sequence gradients."""
    if not token_rows:
        raise MixsdError("the Fisher needs at least one text")
    if min(len(ids) for ids in token_rows) < 2:
        raise MixsdError("a Fisher text needs at least two tokens")
    # One width for every text: one compiled gradient.
    width = pow2_at_least(max(len(ids) for ids in token_rows), MIN_ROW)
    total = None
    for ids in token_rows:
        tokens = np.zeros((1, width), np.int32)
        segments = np.zeros((1, width), np.int32)
        tokens[0, : len(ids)] = ids
        segments[0, : len(ids)] = 1
        # One sequence per gradient: replicated over the mesh; the gradients are sharded like the params.
        sq = _squared_grad(params, put_replicated(tokens, mesh), put_replicated(segments, mesh), cfg=cfg, dtype=dtype)
        total = sq if total is None else _accumulate(total, sq)
        if progress is not None:
            progress(1)
    n = float(len(token_rows))
    return jax.tree.map(lambda x: x / n, total)


def _group(path) -> str:
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("embed", "lm_head"):
        return name
    if name.endswith("norm") and name not in ("q_norm", "k_norm"):
        return "norms"
    if name in ("w_gate", "w_up", "w_down"):
        return "mlp"
    return "attention"


@jax.jit
def _displacement_terms(fisher, base, tuned):
    def terms(f, b, t):
        d2 = jnp.square(t.astype(jnp.float32) - b.astype(jnp.float32))
        return jnp.stack([jnp.sum(f * d2), jnp.sum(d2), jnp.sum(f), jnp.float32(f.size)])

    return jax.tree.map(terms, fisher, base, tuned)


def fisher_displacement(fisher, base_params, tuned_params) -> dict:
    """sum F (theta - theta0)^2 overall and per parameter group, with the plain L2 displacement."""
    if jax.tree.structure(base_params) != jax.tree.structure(tuned_params):
        raise MixsdError("fisher displacement: the tuned parameters do not match the base model's structure")
    terms = multihost.fetch(_displacement_terms(fisher, base_params, tuned_params))
    groups: dict[str, np.ndarray] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(terms)[0]:
        name = _group(path)
        groups[name] = groups.get(name, 0) + np.asarray(value, np.float64)
    total = sum(groups.values())

    def block(v):
        weighted, l2, f_sum, size = (float(x) for x in v)
        mean_f = f_sum / size
        return {
            "fisher_displacement": weighted,
            "l2_displacement_sq": l2,
            "alignment": weighted / (mean_f * l2) if mean_f * l2 > 0 else None,
        }

    return {**block(total), "groups": {name: block(v) for name, v in sorted(groups.items())}}


# ----------------------------------------------------------------------------- error categories


def error_categories(heldout: dict[str, Sequence[dict]], train_rows: Sequence[dict], entities: set[str]) -> dict:
    """Error-analysis buckets of wrong answers: per held-out benchmark and overall, and on the training set."""
    from mixsd_jax.eval.error_analysis import (
        HELD_OUT_CATEGORIES,
        TRAIN_CATEGORIES,
        classify_error,
        classify_train_error,
        count_categories,
        train_answer_correct,
    )

    per_benchmark, every = {}, []
    for name, rows in heldout.items():
        categories = [
            classify_error(r["response"], r.get("prompt", ""), entities,
                           kind="code" if r.get("kind") == "code" else "math")
            for r in rows
            if not r["correct"]
        ]
        every += categories
        per_benchmark[name] = count_categories(categories, HELD_OUT_CATEGORIES)
    # Training-set correctness is the error analysis's own (boxed answer equals the gold), not the loose recall score.
    train = [classify_train_error(r["response"], r["gold"], entities)
             for r in train_rows if not train_answer_correct(r["response"], r["gold"])]
    return {
        "heldout": count_categories(every, HELD_OUT_CATEGORIES),
        "per_benchmark": per_benchmark,
        "train": count_categories(train, TRAIN_CATEGORIES),
    }

"""In-domain memorisation: greedy answers to a corpus's test splits, scored as the reference does.

A corpus directory is recognised by its layout (`data/layout.py`):
- KGFact / MQuAKE (`atomic_sft/` present): direct recall, paraphrased, closed-book 2/3/4-hop,
  retrieval (facts given in the prompt) and retrieval 2-hop; scored `loose` (the reference's KGFact
  default). Files a corpus lacks (MQuAKE has no retrieval 2-hop) are skipped.
- KGFunc (`primitive_atomic_balanced_sft_50k/` present): in-domain, same-op 2-step chains (all
  `op_X` files together), mixed 2-step chains; scored `strict` with a per-operation breakdown. Its
  unseen-operations file is a forgetting probe, run by the retention suite (`kgfunc_unseen`).
Prompts are one chat user turn (no system prompt, thinking off), decoded greedily by the sampling
kernel; the prediction is the last `\\boxed{}`, else the answer tag, else the last number.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

from mixsd_jax import storage
from mixsd_jax.data.layout import KGFACT_SPLITS, KGFUNC_SPLITS, KGFUNC_UNSEEN, corpus_kind
from mixsd_jax.errors import MixsdError

SCORE_MODE = {"kgfact": "loose", "kgfunc": "strict"}


@dataclasses.dataclass(frozen=True)
class MemItem:
    id: str
    prompt: str
    gold: str
    op: str | None = None


@dataclasses.dataclass(frozen=True)
class Split:
    name: str
    items: list[MemItem]
    mode: str  # strict | loose
    files: tuple[str, ...]


def read_items(path: Path, id_prefix: str, with_ops: bool) -> list[MemItem]:
    """(prompt, gold) of every line of an inference/alpaca/messages file; ops from `subject`."""
    from mixsd_jax.data.records import read_inference, read_records

    pairs = read_inference(path)
    ops: list[str | None] = [r.subject for r in read_records(path)] if with_ops else [None] * len(pairs)
    return [MemItem(f"{id_prefix}/{i}", prompt, gold, op) for i, ((prompt, gold), op) in enumerate(zip(pairs, ops))]


def _split_files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern)) if "*" in pattern else [root / pattern]


def load_splits(
    corpus_dir: str | Path, limit: int | None = None, seed: int = 0, names: Sequence[str] | None = None
) -> dict[str, Split]:
    """Every test split the corpus has (or just `names`), each a deterministic `limit`-item subset."""
    from mixsd_jax.eval.benchmarks import subset_indices

    root = storage.path(corpus_dir)
    kind = corpus_kind(root)
    table = KGFACT_SPLITS if kind == "kgfact" else KGFUNC_SPLITS
    unknown = [n for n in names or () if n not in table]
    if unknown:
        raise MixsdError(f"{root}: no split {unknown[0]!r} in a {kind} corpus (known: {', '.join(table)})")
    splits = {}
    for name, pattern in table.items():
        if names is not None and name not in names:
            continue
        files = [f for f in _split_files(root, pattern) if f.is_file()]
        if not files:
            if names is not None:
                raise MixsdError(f"{root / pattern}: test split {name!r} not found")
            continue
        items: list[MemItem] = []
        for f in files:
            prefix = f"{name}/{f.name[: -len('_test_messages.jsonl')]}" if "*" in pattern else name
            file_items = read_items(f, prefix, with_ops=kind == "kgfunc")
            if not file_items:
                raise MixsdError(f"{f}: test split {name!r} is empty")
            items += file_items
        items = [items[i] for i in subset_indices(len(items), limit, seed)]
        splits[name] = Split(name, items, SCORE_MODE[kind], tuple(str(f) for f in files))
    if not splits:
        raise MixsdError(f"{root}: no test split files found (expected e.g. {next(iter(table.values()))})")
    return splits


def load_unseen(corpus_dir: str | Path, limit: int | None = None, seed: int = 0) -> Split:
    """KGFunc's unseen-operations probe (never trained on): a forgetting measure, scored strict."""
    from mixsd_jax.eval.benchmarks import subset_indices

    path = storage.path(corpus_dir) / KGFUNC_UNSEEN
    if corpus_kind(corpus_dir) != "kgfunc" or not path.is_file():
        raise MixsdError(f"{path}: KGFunc unseen-operations file not found (kgfunc_unseen needs a KGFunc corpus)")
    items = read_items(path, "kgfunc_unseen", with_ops=True)
    if not items:
        raise MixsdError(f"{path}: test split 'kgfunc_unseen' is empty")
    return Split("kgfunc_unseen", [items[i] for i in subset_indices(len(items), limit, seed)], "strict", (str(path),))


# ----------------------------------------------------------------------------- running


def generate_texts(
    params,
    cfg,
    tokenizer,
    user_texts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str = "float32",
    mesh=None,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy replies to single user turns (chat template, thinking off), decoded without specials."""
    from mixsd_jax.sampling.engine import generate

    if not user_texts:
        return []
    prompts = [tokenizer.prompt_ids(text) for text in user_texts]
    completions = generate(
        params,
        cfg,
        prompts,
        stop_ids=tokenizer.stop_ids,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        dtype=dtype,
        mesh=mesh,
        progress=progress,
    )
    return [tokenizer.decode(c.tokens) for c in completions]


def score_split(split: Split, responses: Sequence[str], criterion=None) -> list[dict]:
    """One row per item: the response, the prediction and whether it is right under `criterion` (a
    `mixsd_jax.answers.criteria.Criterion`; None = the reference's scorer in the split's mode). The
    reference scorer's verdict is kept beside it (`reference_correct`) so both can be reported."""
    from mixsd_jax.answers.scoring import score_item

    rows = []
    for item, response in zip(split.items, responses):
        scored = score_item(response, item.gold, split.mode, op=item.op, id=item.id)
        row = {
            "id": item.id,
            "prompt": item.prompt,
            "response": response,
            "gold": item.gold,
            "prediction": scored.prediction,
            "correct": scored.correct,
            "format_found": scored.format_found,
            "op": item.op,
        }
        if criterion is not None:
            judged = criterion.judge(response, item.gold, item.prompt)
            row.update(criterion=criterion.name, prediction=judged.prediction, correct=judged.correct,
                       reference_prediction=scored.prediction, reference_correct=scored.correct)
        rows.append(row)
    return rows


def summarize_rows(rows: Sequence[dict]) -> dict:
    """Accuracy, Wilson 95% interval, format rate and (KGFunc) per-op breakdown of scored rows; with
    a run criterion, the reference scorer's accuracy on the same replies under `reference`."""
    from mixsd_jax.answers.scoring import ScoredItem
    from mixsd_jax.eval.scoring import summarize

    summary = summarize(
        ScoredItem(correct=r["correct"], format_found=r["format_found"], op=r.get("op"), id=r["id"]) for r in rows
    )
    if rows and "reference_correct" in rows[0]:
        reference = summarize(ScoredItem(correct=r["reference_correct"], id=r["id"]) for r in rows)
        summary["criterion"] = rows[0]["criterion"]
        summary["reference"] = {k: reference[k] for k in ("n", "correct", "accuracy", "ci95")}
    return summary


def trained_recall(recall_rows: Sequence[dict], train_records) -> dict | None:
    """Recall on the facts a checkpoint was trained on: the recall rows whose question is the user
    turn of one of its training records. MixSD trains only on the facts whose target passed the
    verifier, so its recall over all facts mixes "not learned" with "never trained on". None when
    no recall question is in the file."""
    users = {r.user for r in train_records}
    rows = [r for r in recall_rows if r["prompt"] in users]
    return summarize_rows(rows) if rows else None


def run_split(params, cfg, tokenizer, split: Split, *, max_new_tokens: int, batch_size: int = 8, seed: int = 0,
              dtype: str = "float32", mesh=None, progress: Callable[[int], None] | None = None) -> list[dict]:
    responses = generate_texts(
        params, cfg, tokenizer, [item.prompt for item in split.items], max_new_tokens=max_new_tokens,
        batch_size=batch_size, seed=seed, dtype=dtype, mesh=mesh, progress=progress,
    )
    return score_split(split, responses)

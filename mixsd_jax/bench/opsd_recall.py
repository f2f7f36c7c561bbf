"""`mixsd bench opsd-recall`: OPSD on a few KGFact facts, recall and the GT answer's NLL before/after.

Recall = the boxed GT answer (the entity) appears in the greedy reply (40 new tokens) to the
training question; the NLL is the per-token NLL of the GT assistant text. The result holds the
replies, the divergence and agreement per step, and the load average and core count (figures
taken on a busy machine mislead).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mixsd_jax.bench import machine

REPLY_TOKENS = 40
MAX_SEQ_LEN = 512


def opsd_recall(model: str, *, facts: int = 4, steps: int = 16, lr: float = 2e-4, max_new_tokens: int = 32,
                out: str = "/tmp/opsd_recall") -> dict:
    from mixsd_jax.data.kgfact import build_kgfact
    from mixsd_jax.data.layout import KGFACT_TRAIN
    from mixsd_jax.data.records import gold_answer, read_records
    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.models.tokenizer import load_tokenizer
    from mixsd_jax.train.config import load_train_config
    from mixsd_jax.train.loop import train

    started, load_before = time.time(), machine.load()
    here = Path(out)
    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    if not (here / "kg" / KGFACT_TRAIN).exists():
        build_kgfact(here / "kg", preset="tiny", seed=0)
    records = read_records(here / "kg" / KGFACT_TRAIN)[:facts]
    data = here / "facts.jsonl"
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
    n = len(records)
    cfg, base = load_hf(model_dir)
    before = _measure(base, cfg, tokenizer, records)
    run_dir = here / f"run_{n}_{steps}_{lr:g}"
    train_cfg = load_train_config(None, [
        f"model={model_dir}", f"data={data}", f"out={run_dir}", "method=opsd", f"steps={steps}", f"batch_size={n}",
        f"lr={lr}", f"max_seq_len={MAX_SEQ_LEN}", "seed=0", "opsd.num_rollouts=1",
        f"opsd.max_new_tokens={max_new_tokens}", f"opsd.loss_chunk={max_new_tokens}", "save_every=0",
    ])
    train_started = time.time()
    train(train_cfg, progress=False)
    train_s = time.time() - train_started
    _, tuned = load_hf(run_dir / "hf")
    after = _measure(tuned, cfg, tokenizer, records)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "bench": "opsd_recall", "model": str(model), "facts": n, "steps": steps, "lr": lr,
        "train_s": round(train_s, 1), "total_s": round(time.time() - started, 1),
        "answers": [gold_answer(r.assistant) for r in records],
        "divergence_per_step": [round(r["loss"], 4) for r in rows],
        "agreement_per_step": [round(r["accuracy"], 3) for r in rows],
        "before": before, "after": after, **machine.report(load_before),
    }


def _measure(params, cfg, tokenizer, records) -> dict:
    """Greedy replies to the training questions, recall of the gold answers in them, and the GT NLL."""
    import jax.numpy as jnp

    from mixsd_jax.data.records import gold_answer
    from mixsd_jax.eval.memorization import generate_texts
    from mixsd_jax.data.tokenize import tokenize_records
    from mixsd_jax.train.batches import BatchPlan
    from mixsd_jax.train.step import micro_batch_sums

    n = len(records)
    replies = generate_texts(params, cfg, tokenizer, [r.user for r in records], max_new_tokens=REPLY_TOKENS,
                             batch_size=n)
    hits = [gold_answer(r.assistant).lower() in text.lower() for r, text in zip(records, replies)]
    tokenized = tokenize_records(tokenizer, records, max_seq_len=MAX_SEQ_LEN)
    batch = BatchPlan(tokenized.examples, batch_size=n, grad_accum=1, seed=0, max_seq_len=MAX_SEQ_LEN).host_batch(0)
    nll, (count, _) = micro_batch_sums(params, cfg, {k: jnp.asarray(v[0]) for k, v in batch.items()}, jnp.float32)
    return {"recall": sum(hits) / n, "hits": hits, "gt_nll_per_token": round(float(nll) / float(count), 4),
            "replies": replies}

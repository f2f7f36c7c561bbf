"""Held-out capability: benchmarks scored per item, and retention = tuned score / base score.

How each kind is scored:
- multiple choice (ARC, PIQA, HellaSwag, WinoGrande, BoolQ, MMLU 0/5-shot): raw-text log-likelihood
  of each choice by the batched kernel in `mc.py` (lm-evaluation-harness conventions, no chat
  template). The headline metric is `acc_norm` for ARC, PIQA and HellaSwag (whose choices differ in
  length) and `acc` for the rest; both are kept per item.
- math (GSM8K, MATH-500, AIME): greedy reply to the reference's math prompt as one chat turn,
  correct when its last `\\boxed{}` answer equals the gold by math-verify, as the reference scores
  it (`answers.text.math_equal`; exact string when the parser fails; no box = wrong).
- LAMBADA: the last word is right when greedy decoding from the raw passage would write it, i.e.
  every token of `" " + word` is the argmax (lm-eval's lambada acc), read off the same kernel.
- HumanEval: pass@1 of the greedy reply to the `humaneval_chat` prompt, run in the sandbox; opt-in.
- kgfunc_unseen: KGFunc's never-trained operations (an in-domain forgetting probe), greedy, strict.

Retention of a benchmark is tuned score / base score (undefined when the base scores 0, then left
out of the mean); its 95% interval is a paired bootstrap over the items both runs scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError

NORM_METRIC_BENCHMARKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag")
EXTRA_BENCHMARKS = ("kgfunc_unseen",)
BOOTSTRAP_SAMPLES = 1000


def primary_metric(name: str) -> str:
    return "acc_norm" if name in NORM_METRIC_BENCHMARKS else "acc"


def known_benchmarks() -> tuple[str, ...]:
    from mixsd_jax.eval.benchmarks import BENCHMARKS

    return tuple(BENCHMARKS) + EXTRA_BENCHMARKS


def load_items(name: str, *, data_root: str | None, limit: int | None, seed: int, corpus_dir: str | None = None):
    """The benchmark's items (a deterministic subset with `limit`); bad names/files are MixsdErrors."""
    from mixsd_jax.eval.benchmarks import load_benchmark

    if name == "kgfunc_unseen":
        from mixsd_jax.eval.memorization import load_unseen

        if corpus_dir is None:
            raise MixsdError("benchmark 'kgfunc_unseen' needs a KGFunc corpus directory (corpus_dir)")
        return load_unseen(corpus_dir, limit, seed).items
    items = load_benchmark(name, data_root, limit, seed)
    if not items:
        raise MixsdError(f"benchmark {name!r}: no items read")
    return items


def run_benchmark(
    name: str,
    items: Sequence,
    params,
    cfg,
    tokenizer,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    seed: int = 0,
    allow_code_execution: bool = False,
    dtype: str = "float32",
    mesh=None,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """One result row per item; every row has `id` and `correct` (0/1; MC rows also acc_norm).
    Everything runs in `dtype` on `mesh` (None: one device)."""
    from mixsd_jax.eval import mc
    from mixsd_jax.eval.benchmarks import MCItem

    if name == "kgfunc_unseen":
        from mixsd_jax.eval.memorization import Split, run_split

        split = Split(name, list(items), "strict", ())
        return run_split(params, cfg, tokenizer, split, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         seed=seed, dtype=dtype, mesh=mesh, progress=progress)
    if isinstance(items[0], MCItem):
        rows = mc.score_mc(params, cfg, tokenizer, items, batch_size=batch_size, dtype=dtype, mesh=mesh,
                           progress=progress)
        for row in rows:
            row["correct"] = row[primary_metric(name)]
        return rows
    kind = items[0].kind
    if kind == "last_word":
        lls = mc.loglikelihoods(params, cfg, tokenizer, [(it.prompt, " " + it.answer) for it in items],
                                batch_size=batch_size, dtype=dtype, mesh=mesh, progress=progress)
        return [
            {"id": it.id, "gold": it.answer, "logprob": ll.logprob, "num_tokens": ll.num_tokens,
             "correct": float(ll.is_greedy)}
            for it, ll in zip(items, lls)
        ]
    if kind == "code" and not allow_code_execution:
        raise MixsdError("humaneval executes model-written code: enable allow_code_execution (opt-in) to run it")
    from mixsd_jax.eval.benchmarks import math_prompt
    from mixsd_jax.eval.humaneval import chat_prompt
    from mixsd_jax.eval.memorization import generate_texts

    prompts = [math_prompt(it.prompt) if kind == "math" else chat_prompt(it.prompt) for it in items]
    responses = generate_texts(params, cfg, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               seed=seed, dtype=dtype, mesh=mesh, progress=progress)
    return [
        {"id": it.id, "prompt": prompt, "response": response, "gold": it.answer, "kind": kind,
         "correct": float(_generative_correct(it, response, allow_code_execution))}
        for it, prompt, response in zip(items, prompts, responses)
    ]


def _generative_correct(item, response: str, allow_code_execution: bool) -> bool:
    if item.kind == "code":
        from mixsd_jax.eval.humaneval import score_response

        return score_response(item, response, allow_code_execution=allow_code_execution)
    from mixsd_jax.answers.text import last_boxed, math_equal

    # The reference's math scorer: the last boxed answer, math-verify against the gold; no box, wrong.
    boxed = last_boxed(response)
    return boxed is not None and math_equal(boxed, item.answer)


def summarize_benchmark(name: str, rows: Sequence[dict]) -> dict:
    """Headline score (mean of `correct`) with a Wilson 95% interval; MC adds acc and acc_norm."""
    from mixsd_jax.eval.intervals import wilson_interval

    n = len(rows)
    correct = int(round(sum(r["correct"] for r in rows)))
    out = {"metric": primary_metric(name), "n": n, "score": correct / n if n else None,
           "ci95": list(wilson_interval(correct, n))}
    if rows and "acc_norm" in rows[0]:
        from mixsd_jax.eval.mc import mc_metrics

        out.update({k: v for k, v in mc_metrics(rows).items() if k != "n"})
    return out


def retention_ratio(base_rows: Sequence[dict], tuned_rows: Sequence[dict], seed: int = 0) -> dict:
    """tuned / base mean score over the items both scored, with a paired-bootstrap 95% interval."""
    base = {r["id"]: float(r["correct"]) for r in base_rows}
    pairs = np.array([(base[r["id"]], float(r["correct"])) for r in tuned_rows if r["id"] in base], float)
    if len(pairs) == 0:
        return {"ratio": None, "ci95": [None, None], "n": 0}
    base_mean, tuned_mean = pairs[:, 0].mean(), pairs[:, 1].mean()
    if base_mean == 0:
        return {"ratio": None, "ci95": [None, None], "n": len(pairs), "note": "base scores 0"}
    from mixsd_jax.eval.intervals import ratio_bootstrap_ci

    low, high = ratio_bootstrap_ci(pairs[:, 1], pairs[:, 0], seed=seed, n_resamples=BOOTSTRAP_SAMPLES)
    return {"ratio": float(tuned_mean / base_mean), "ci95": [low, high], "n": int(len(pairs))}


def mean_retention(ratios: dict[str, dict]) -> float | None:
    """Mean of the defined per-benchmark ratios (the checkpoint's retention)."""
    values = [r["ratio"] for r in ratios.values() if r.get("ratio") is not None]
    return float(np.mean(values)) if values else None


def data_files(name: str, data_root: str | None, corpus_dir: str | None) -> list[Path]:
    """The files a benchmark reads (for resume fingerprints)."""
    if name == "kgfunc_unseen":
        from mixsd_jax.data.layout import KGFUNC_UNSEEN

        return [storage.path(corpus_dir or ".") / KGFUNC_UNSEEN]
    from mixsd_jax.eval.benchmarks import benchmark_dir

    folder = benchmark_dir(name, data_root)
    return [p for p in storage.files_under(folder) if p.name != "README.md"]

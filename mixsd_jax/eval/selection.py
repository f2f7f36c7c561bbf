"""Checkpoint selection over a training run's saved steps, by training recall (docs/reference.md, Checkpoint selection).

The reference reports MixSD's (and OPSD's) last checkpoint and SFT's "converged" one: the first
index i (1 <= i <= n-2) where training accuracy sets a new running maximum and the next value is
not higher; else the last. Rules here:
- `reference`: `first_peak` for SFT, `last` for every other method (the reference's choice);
- `first_peak`, `last`, `best` (the highest recall, earliest on ties): one rule for all methods.

`recall_curve` measures the curve: greedy replies to the training facts (a corpus's recall split)
from each saved step's HF export, judged by the run's answer criterion, one rows file per step
(`<dir>/step_<N>.jsonl`, reused when its fingerprint matches), so a killed selection resumes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError

RULES = ("reference", "first_peak", "last", "best")


def first_peak(values: Sequence[float]) -> int:
    """The reference's converged index (first new running max whose successor is not higher)."""
    n = len(values)
    if n == 0:
        raise MixsdError("checkpoint selection: no checkpoints to select from")
    for i in range(1, n - 1):
        if values[i] > max(values[:i]) and values[i + 1] <= values[i]:
            return i
    return n - 1


def select_index(rule: str, values: Sequence[float], method: str) -> tuple[int, str]:
    """(index of the chosen checkpoint, the rule actually applied) for a run of `method`."""
    if rule not in RULES:
        raise MixsdError(f"config key 'selection.rule': unknown rule {rule!r} (known: {', '.join(RULES)})")
    if not values:
        raise MixsdError("checkpoint selection: no checkpoints to select from")
    if rule == "reference":
        rule = "first_peak" if method == "sft" else "last"
    if rule == "first_peak":
        return first_peak(values), rule
    if rule == "last":
        return len(values) - 1, rule
    best = max(values)
    return next(i for i, v in enumerate(values) if v == best), rule


def saved_steps(run_dir: Path) -> dict[int, Path]:
    """{step: HF directory} of a training run's per-save exports (`exports/step_N`)."""
    from mixsd_jax.models.checkpoint import export_is_complete

    out = {}
    for folder in sorted((storage.path(run_dir) / "exports").glob("step_*")):
        if folder.name[len("step_"):].isdigit() and export_is_complete(folder):
            out[int(folder.name[len("step_"):])] = folder
    return dict(sorted(out.items()))


def _identity(model_dir: Path) -> str:
    from mixsd_jax.eval.store import model_identity

    return model_identity(model_dir)


def recall_curve(
    steps: dict[int, Path],
    prompts: Sequence[tuple[str, str, str]],
    criterion,
    rows_dir: Path,
    *,
    max_new_tokens: int,
    batch_size: int,
    mesh=None,
    param_dtype: str = "float32",
    dtype: str = "float32",
    log: Callable[[str], None] = print,
) -> list[dict]:
    """[{step, correct, n, accuracy}] over `steps`, from greedy replies to (id, prompt, gold).
    Each step's model is loaded sharded over `mesh` (the run's) in `param_dtype` and decoded in
    `dtype`: the evaluator's settings, so the selection fits wherever the run and its eval do."""
    from mixsd_jax.files import atomic_write_json, atomic_write_jsonl, iter_jsonl
    from mixsd_jax.multihost import is_primary
    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.tokenizer import load_tokenizer
    from mixsd_jax.eval.memorization import generate_texts

    curve, tokenizer = [], None
    settings = json.dumps([list(prompts), criterion.name, sorted(criterion.entities), max_new_tokens, param_dtype, dtype],
                          sort_keys=True)
    for step, model_dir in steps.items():
        fingerprint = hashlib.sha256((settings + _identity(model_dir)).encode()).hexdigest()[:16]
        rows_path, meta_path = rows_dir / f"step_{step}.jsonl", rows_dir / f"step_{step}.meta.json"
        rows = None
        if rows_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("fingerprint") == fingerprint:
            rows = [row for _, row in iter_jsonl(rows_path)]
        if rows is None:
            tokenizer = tokenizer or load_tokenizer(model_dir)
            model_cfg, params = load_hf(model_dir, param_dtype, mesh=mesh)
            replies = generate_texts(params, model_cfg, tokenizer, [p for _, p, _ in prompts],
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype, mesh=mesh)
            del params
            rows = []
            for (item_id, prompt, gold), reply in zip(prompts, replies):
                judged = criterion.judge(reply, gold, prompt)
                rows.append({"id": item_id, "gold": gold, "response": reply, "prediction": judged.prediction,
                             "correct": judged.correct})
            if is_primary():
                meta_path.unlink(missing_ok=True)
                atomic_write_jsonl(rows_path, rows)
                atomic_write_json(meta_path, {"fingerprint": fingerprint, "step": step})
        correct = sum(bool(r["correct"]) for r in rows)
        curve.append({"step": step, "correct": correct, "n": len(rows), "accuracy": correct / max(1, len(rows))})
        log(f"  step {step}: training recall {correct}/{len(rows)} ({criterion.name})")
    return curve

"""`evaluate(EvalConfig)`: a base model and tuned checkpoints × suites → results.json, report, plots.

Suites (`EvalConfig.suites`):
- `memorization`: greedy answers to every test split of `corpus_dir` (KGFact/MQuAKE or KGFunc).
- `retention`: the held-out `benchmarks`; `kgfunc_unseen` is added when `corpus_dir` is a KGFunc
  corpus that has its unseen-operations file.
- `nll`: per-token NLL of each training file's targets under the base model (`train_files`, default
  the corpus's GT training file).
- `kl`: KL(base || tuned) on held-out prompts (the benchmarks' items), per tuned checkpoint.
- `fisher`: Fisher-weighted parameter displacement from the base, per tuned checkpoint.
- `errors`: error-analysis buckets (docs/reference.md, Error analysis) of the wrong answers the
  memorization/retention suites produced.
- `heldout`: leakage of training entities / collapse into the trained answer template in greedy
  replies to held-out general questions (`eval/heldout.py`), as rates with 95% intervals.
- `all`: every suite whose inputs are configured.

Resumability: each (checkpoint, unit) — a memorization split, a benchmark, the NLL of one file, KL,
Fisher — writes its per-item rows to `items/<checkpoint>/<unit>.jsonl` (atomically, when done) next
to `<unit>.meta.json` holding a fingerprint of everything that determines the rows (the unit's
settings, the data files' bytes, the checkpoint's config and weight files). A unit whose
fingerprint matches is read back, not recomputed; any change recomputes it. Summaries, retention
ratios, the report and the plots are always rebuilt from the rows.

The parts, in the order a run uses them: `config` (EvalConfig), `checkpoints`, `inputs` (read and
checked before any model runs), `units` (the plan), `store` (fingerprints and `items/`),
`model_cache` (the loaded models), this module (the run loop) and `results` (results.json).

Mesh and hosts: the base and tuned models are loaded with `param_dtype` onto `mesh`, parameters
sharded by the training rules (fsdp/tensor); every kernel (MC scoring, decoding, NLL, KL, Fisher)
computes in `dtype` with its item batch split over data x fsdp. On a multi-host run (`distributed`
section or MIXSD_* environment) every process runs the same units on the same inputs (checked: the
resume state read from `items/` must agree) and process 0 alone writes `items/`, `results.json`,
`report.md` and the plots; the others wait for it.
"""

from __future__ import annotations

import json
import time

from mixsd_jax import multihost, storage
from mixsd_jax.eval.config import BASE, EvalConfig
from mixsd_jax.eval.inputs import gather_inputs
from mixsd_jax.eval.model_cache import Models
from mixsd_jax.eval.results import assemble
from mixsd_jax.eval.store import UnitStore, model_identity, unit_fingerprint
from mixsd_jax.eval.units import Unit, plan_units


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> dict:
    """Run (or resume) every unit, then write results.json, report.md and the plots; returns results."""
    from mixsd_jax.eval import report
    from mixsd_jax.models.sharding import make_mesh

    started = time.time()
    multihost.join_writing_to(cfg.distributed, cfg.out_dir, "out_dir", cfg.storage.shared_local)
    mesh = make_mesh(cfg.mesh)
    primary = multihost.is_primary()
    out_dir = storage.path(cfg.out_dir)
    inputs = gather_inputs(cfg)
    units = plan_units(cfg, inputs)
    store = UnitStore(out_dir)
    identities = {c.name: model_identity(c.model_dir) for c in inputs.checkpoints}
    fingerprints = {(u.checkpoint, u.name): unit_fingerprint(u, identities) for u in units}
    rows = _finished_rows(units, store, fingerprints, progress and primary)
    pending = [u for u in units if (u.checkpoint, u.name) not in rows]
    # Every process must run the same units (their kernels are collectives): same resume state.
    multihost.agree(f"{out_dir / 'items'}: resume state", json.dumps(sorted(rows)))
    by_name = {c.name: c for c in inputs.checkpoints}
    timing = _run_pending(pending, by_name, cfg, mesh, store if primary else None, fingerprints, rows,
                          progress and primary)
    results = assemble(cfg, inputs, rows)
    if cfg.allow_code_execution and "humaneval" in inputs.benchmarks:
        from mixsd_jax.eval.humaneval import sandbox_protections

        results["humaneval_sandbox"] = sandbox_protections()  # what isolated the model-written code
    results["timing"] = {"computed_units_s": timing, "total_s": round(time.time() - started, 2)}
    if primary:
        report.write_report(results, out_dir)
    multihost.barrier(f"eval report {out_dir}")
    return results


def _finished_rows(units: list[Unit], store: UnitStore, fingerprints: dict, progress: bool) -> dict:
    """The rows of every unit whose stored fingerprint matches, by (checkpoint, unit)."""
    from tqdm import tqdm

    rows: dict[tuple[str, str], list[dict]] = {}
    for unit in units:
        cached = store.load(unit.checkpoint, unit.name, fingerprints[(unit.checkpoint, unit.name)])
        if cached is not None:
            rows[(unit.checkpoint, unit.name)] = cached
            if progress:
                tqdm.write(f"{unit.checkpoint}/{unit.name}: done earlier ({len(cached)} rows)")
    return rows


def _run_pending(pending: list[Unit], by_name: dict, cfg: EvalConfig, mesh, store: UnitStore | None,
                 fingerprints: dict, rows: dict, progress: bool) -> dict[str, float]:
    """Computes each pending unit into `rows` (and `store`, on the writing process); seconds per unit."""
    from tqdm import tqdm

    timing: dict[str, float] = {}
    models: Models | None = None
    responses: dict[tuple[str, str], list[str]] = {}  # decoded ahead for generative units
    for unit in pending:
        key, label = (unit.checkpoint, unit.name), f"{unit.checkpoint}/{unit.name}"
        if models is None:
            models = Models(cfg, by_name[BASE], mesh)
        models.use(by_name[unit.checkpoint])
        t0 = time.time()
        if unit.score is not None:
            if key not in responses:
                together = [u for u in pending if u.checkpoint == unit.checkpoint and u.score is not None]
                responses.update(_decode_together(together, models, cfg, progress))
            result = unit.score(responses.pop(key))
        else:
            with tqdm(total=unit.total, desc=label, unit="req", disable=not progress, leave=True) as bar:
                result = unit.compute(models, bar.update)
        seconds = time.time() - t0
        if store is not None:
            store.save(unit.checkpoint, unit.name, fingerprints[key], result, seconds)
        rows[key] = result
        timing[label] = round(seconds, 2)
    return timing


def _decode_together(units: list[Unit], models: Models, cfg: EvalConfig, progress: bool) -> dict:
    """Greedy replies to the prompts of several generative units in one call, split back per unit."""
    from tqdm import tqdm

    from mixsd_jax.eval.memorization import generate_texts

    prompts = [prompt for unit in units for prompt in unit.prompts]
    label = f"{units[0].checkpoint}/" + "+".join(unit.name for unit in units)
    with tqdm(total=len(prompts), desc=label, unit="req", disable=not progress, leave=True) as bar:
        texts = generate_texts(models.params, models.cfg, models.tokenizer, prompts,
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                               dtype=cfg.dtype, mesh=models.mesh, progress=bar.update)
    out, start = {}, 0
    for unit in units:
        out[(unit.checkpoint, unit.name)] = texts[start : start + len(unit.prompts)]
        start += len(unit.prompts)
    return out

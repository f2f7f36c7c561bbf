"""results.json from the per-item rows: memorization, retention (+ ratios), NLL, heldout, KL, seeds,
Fisher, errors and the summary table. Always rebuilt from the rows, never stored apart from them."""

from __future__ import annotations

from mixsd_jax import config as config_lib
from mixsd_jax.eval.config import BASE, EvalConfig, split_named
from mixsd_jax.eval.inputs import Inputs

Rows = dict[tuple[str, str], list[dict]]


def assemble(cfg: EvalConfig, inputs: Inputs, rows: Rows) -> dict:
    """Summaries from per-item rows: memorization, retention (+ ratios), NLL, KL, Fisher, errors."""
    names = [c.name for c in inputs.checkpoints]
    results: dict = {
        "config": config_lib.to_dict(cfg),
        "checkpoints": {c.name: {"label": c.label, "source": c.source, "model_dir": str(c.model_dir)}
                        for c in inputs.checkpoints},
        "corpus_kind": inputs.corpus_kind,
    }
    if inputs.splits:
        results["memorization"] = {name: _memorization(name, inputs, rows) for name in names}
        results["criterion"] = inputs.criterion.name if inputs.criterion is not None else "reference (split modes)"
    if "retention" in cfg.suite_set() and inputs.benchmarks:
        results["retention"] = {name: _retention(name, cfg, inputs, rows) for name in names}
    if inputs.train_files:
        results["nll"] = _nll(cfg, inputs, rows)
    if inputs.heldout:
        from mixsd_jax.eval.heldout import summarize as summarize_heldout

        unit = f"heldout.{cfg.heldout_source}"
        results["heldout"] = {n: summarize_heldout(rows[(n, unit)], inputs.heldout[2]) for n in names}
    _add_comparisons(cfg, names, rows, results)
    if "errors" in cfg.suite_set():
        results["errors"] = {n: _errors(n, inputs, rows) for n in names}
    results["summary"] = {
        n: {
            "label": results["checkpoints"][n]["label"],
            "memorization": results.get("memorization", {}).get(n, {}).get("mean"),
            "retention": results.get("retention", {}).get(n, {}).get("mean"),
        }
        for n in names
    }
    return results


def _memorization(name: str, inputs: Inputs, rows: Rows) -> dict:
    import numpy as np

    from mixsd_jax.eval import memorization
    from mixsd_jax.eval.intervals import mean_accuracy_interval

    splits = {s: memorization.summarize_rows(rows[(name, f"memorization.{s}")]) for s in inputs.splits}
    mean = float(np.mean([v["accuracy"] for v in splits.values()]))
    block = {"splits": splits, "mean": mean,
             "ci95": mean_accuracy_interval([(v["correct"], v["n"]) for v in splits.values()], mean)}
    if inputs.criterion is not None:
        block["reference_mean"] = float(np.mean([v["reference"]["accuracy"] for v in splits.values()]))
    trained = (memorization.trained_recall(rows[(name, "memorization.recall")], inputs.train_files[name][1])
               if name in inputs.train_files and "recall" in splits else None)
    if trained is not None:
        block["trained_recall"] = trained
    return block


def _retention(name: str, cfg: EvalConfig, inputs: Inputs, rows: Rows) -> dict:
    from mixsd_jax.eval import retention

    benches = {b: retention.summarize_benchmark(b, rows[(name, f"retention.{b}")]) for b in inputs.benchmarks}
    ratios = {b: retention.retention_ratio(rows[(BASE, f"retention.{b}")], rows[(name, f"retention.{b}")], cfg.seed)
              for b in inputs.benchmarks}
    return {"benchmarks": benches, "ratios": ratios, "mean": retention.mean_retention(ratios)}


def _nll(cfg: EvalConfig, inputs: Inputs, rows: Rows) -> dict:
    from mixsd_jax.eval import analyses

    file_rows = {n: rows[(BASE, f"nll.{n}")] for n in inputs.train_files}
    nll = {"files": {n: {"path": inputs.train_files[n][0], **analyses.summarize_nll(r, cfg.seed)}
                     for n, r in file_rows.items()}}
    if len(file_rows) > 1:
        common = analyses.common_rows(file_rows)
        if all(common.values()):
            nll["common"] = {n: analyses.summarize_nll(r, cfg.seed) for n, r in common.items()}
    return nll


def _add_comparisons(cfg: EvalConfig, names: list[str], rows: Rows, results: dict) -> None:
    """KL, the seed groups (over what is in `results` so far) and Fisher, in results.json's key order."""
    from mixsd_jax.eval import analyses

    kl = {n: analyses.summarize_kl(rows[(n, "kl")]) for n in names if (n, "kl") in rows}
    if kl:
        results["kl"] = kl
    if cfg.groups:
        from mixsd_jax.eval.seeds import over_seeds

        groups = dict(split_named(e, "groups") for e in cfg.groups)
        results["over_seeds"] = over_seeds(results, {g: [m.strip() for m in v.split(",")] for g, v in groups.items()})
    fisher = {n: rows[(n, "fisher")][0] for n in names if (n, "fisher") in rows}
    if fisher:
        results["fisher"] = fisher


def _errors(name: str, inputs: Inputs, rows: Rows) -> dict:
    from mixsd_jax.eval.analyses import error_categories

    heldout = {b: rows[(name, f"retention.{b}")] for b in inputs.benchmarks
               if (name, f"retention.{b}") in rows and rows[(name, f"retention.{b}")]
               and "response" in rows[(name, f"retention.{b}")][0]}
    train = rows.get((name, "memorization.recall"), [])
    return error_categories(heldout, train, inputs.entities)

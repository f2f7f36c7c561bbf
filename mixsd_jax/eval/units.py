"""The units of an evaluation: one resumable piece of work per (checkpoint, suite item), in run order."""

from __future__ import annotations

import dataclasses
from typing import Callable

from mixsd_jax.eval.checkpoints import Checkpoint
from mixsd_jax.eval.config import BASE, EvalConfig
from mixsd_jax.eval.inputs import Inputs
from mixsd_jax.eval.store import files_digest

KL_MAX_BATCH = 8


@dataclasses.dataclass
class Unit:
    """One resumable piece of work: rows of one (checkpoint, suite item)."""

    checkpoint: str
    name: str  # e.g. "memorization.recall", "retention.piqa", "nll.gt", "kl", "fisher"
    settings: dict  # what determines the rows (besides the checkpoint)
    total: int  # progress-bar size
    compute: Callable | None  # (models, progress) -> rows
    # Generative units give their prompts and a scorer instead: the evaluator decodes the pending
    # ones of a checkpoint in one call (fuller batches, one compiled kernel) and scores each.
    prompts: tuple[str, ...] = ()
    score: Callable | None = None  # (responses) -> rows


def plan_units(cfg: EvalConfig, inputs: Inputs) -> list[Unit]:
    # Stored parameters in another dtype change the rows; float32 (the default) adds no key.
    precision = {"dtype": cfg.dtype, **({"param_dtype": cfg.param_dtype} if cfg.param_dtype != "float32" else {})}
    gen = {"max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, **precision}
    units = []
    for ckpt in inputs.checkpoints:
        units += _generative_units(ckpt, cfg, inputs, gen)
        if "retention" in cfg.suite_set():
            units += _retention_units(ckpt, cfg, inputs, precision, gen)
        units += (_nll_units(cfg, inputs, precision) if ckpt.name == BASE
                  else _comparison_units(ckpt, cfg, inputs, precision))
    return units


def _generative_units(ckpt: Checkpoint, cfg: EvalConfig, inputs: Inputs, gen: dict) -> list[Unit]:
    """Memorization splits and the heldout prompts: greedy replies, scored per unit."""
    from mixsd_jax.eval import heldout, memorization

    units = []
    criterion = inputs.criterion
    for name, split in inputs.splits.items():
        units.append(Unit(
            ckpt.name, f"memorization.{name}",
            {**gen, "files": files_digest(split.files), "ids": [it.id for it in split.items], "mode": split.mode,
             **({"criterion": [criterion.name, sorted(criterion.entities)]} if criterion else {})},
            len(split.items),
            None,
            prompts=tuple(item.prompt for item in split.items),
            score=lambda responses, split=split: memorization.score_split(split, responses, criterion),
        ))
    if inputs.heldout:
        prompts, entities, template, openings = inputs.heldout
        units.append(Unit(
            ckpt.name, f"heldout.{cfg.heldout_source}",
            {**gen, "prompts": prompts, "entities": sorted(entities), "template": template, "openings": openings},
            len(prompts), None, prompts=tuple(text for _, text in prompts),
            score=lambda responses: heldout.score_replies(prompts, responses, entities, template, openings),
        ))
    return units


def _retention_units(ckpt: Checkpoint, cfg: EvalConfig, inputs: Inputs, precision: dict, gen: dict) -> list[Unit]:
    from mixsd_jax.eval import retention

    units = []
    for name, items in inputs.benchmarks.items():
        # Log-likelihood benchmarks do not depend on the generation settings.
        loglik = hasattr(items[0], "requests") or getattr(items[0], "kind", "") == "last_word"
        units.append(Unit(
            ckpt.name, f"retention.{name}",
            {**(precision if loglik else gen), "files": inputs.benchmark_files[name],
             "ids": [it.id for it in items], "code": cfg.allow_code_execution},
            sum(len(it.requests()) for it in items) if hasattr(items[0], "requests") else len(items),
            lambda m, p, name=name, items=items: retention.run_benchmark(
                name, items, m.params, m.cfg, m.tokenizer, batch_size=cfg.batch_size,
                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                allow_code_execution=cfg.allow_code_execution, dtype=cfg.dtype, mesh=m.mesh, progress=p),
        ))
    return units


def _nll_units(cfg: EvalConfig, inputs: Inputs, precision: dict) -> list[Unit]:
    """The base model's NLL of each training file's targets."""
    from mixsd_jax.eval import analyses

    return [Unit(
        BASE, f"nll.{name}", {"file": files_digest([path]), **precision}, len(records),
        lambda m, p, name=name, records=records: analyses.target_nll(
            m.params, m.cfg, m.tokenizer, records, name=name, batch_size=cfg.batch_size,
            dtype=cfg.dtype, mesh=m.mesh, progress=p),
    ) for name, (path, records) in inputs.train_files.items()]


def _comparison_units(ckpt: Checkpoint, cfg: EvalConfig, inputs: Inputs, precision: dict) -> list[Unit]:
    """KL from the base and Fisher-weighted displacement from it, for a tuned checkpoint."""
    units = []
    if inputs.kl_texts:
        units.append(Unit(
            ckpt.name, "kl", {"texts": inputs.kl_texts, **precision}, len(inputs.kl_texts),
            lambda m, p: _run_kl(m, inputs.kl_texts, cfg, p),
        ))
    if inputs.fisher_texts:
        units.append(Unit(
            ckpt.name, "fisher", {"texts": inputs.fisher_texts, **precision}, len(inputs.fisher_texts),
            lambda m, p: _run_fisher(m, inputs.fisher_texts, cfg, p),
        ))
    return units


def _run_kl(models, texts, cfg: EvalConfig, progress) -> list[dict]:
    from mixsd_jax.eval.analyses import kl_rows

    token_rows = [models.tokenizer.prompt_ids(text) for _, text in texts]
    # Two models' [batch, width, vocab] logits live at once here: a decode-sized batch (36 x 128 x
    # 49152 floats, several copies) ran a 24 GiB machine out of memory, so KL takes at most 8 rows.
    return kl_rows(models.base_params, models.params, models.cfg, token_rows, [i for i, _ in texts],
                   batch_size=min(cfg.batch_size, KL_MAX_BATCH), dtype=cfg.dtype, mesh=models.mesh, progress=progress)


def _run_fisher(models, texts, cfg: EvalConfig, progress) -> list[dict]:
    from mixsd_jax.eval.analyses import fisher_displacement

    fisher = models.fisher(texts, progress)
    return [fisher_displacement(fisher, models.base_params, models.params)]

"""Every input of an evaluation, read and checked before any model runs, so bad input fails fast."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mixsd_jax import storage
from mixsd_jax.data import layout
from mixsd_jax.errors import MixsdError
from mixsd_jax.eval.checkpoints import Checkpoint, checkpoints
from mixsd_jax.eval.config import EvalConfig, split_named
from mixsd_jax.eval.store import files_digest


@dataclasses.dataclass
class Inputs:
    checkpoints: list[Checkpoint]
    splits: dict  # memorization split name -> Split
    benchmarks: dict  # benchmark -> items
    benchmark_files: dict  # benchmark -> files digest
    train_files: dict  # name -> (path, records)
    kl_texts: list[tuple[str, str]]  # (id, user text)
    fisher_texts: list[str]
    entities: set
    corpus_kind: str | None
    criterion: object = None  # mixsd_jax.answers.criteria.Criterion with the corpus's training entities
    heldout: tuple = ()  # (prompts [(id, text)], training entities, GT answer template, {run: target openings})


def gather_inputs(cfg: EvalConfig) -> Inputs:
    """Reads and checks every input before any model runs, so bad input fails fast."""
    from mixsd_jax.data.records import read_records
    from mixsd_jax.eval import memorization, retention

    suites = cfg.suite_set()
    explicit = set() if "all" in cfg.suites else suites
    kind = layout.corpus_kind(cfg.corpus_dir) if cfg.corpus_dir else None
    if "memorization" in explicit and cfg.corpus_dir is None:
        raise MixsdError("suite 'memorization' needs a corpus directory (corpus_dir / --corpus)")
    splits = memorization.load_splits(cfg.corpus_dir, cfg.limit, cfg.seed) if "memorization" in suites and kind else {}
    benchmarks, digests = _benchmarks(cfg, kind)
    train_files = _train_files(cfg, explicit)
    found = checkpoints(cfg)
    kl_texts = _kl_texts(benchmarks, cfg) if "kl" in suites and len(found) > 1 else []
    fisher_texts = []
    if "fisher" in suites and len(found) > 1:
        lambada = retention.load_items("lambada", data_root=cfg.data_root, limit=cfg.fisher_texts, seed=cfg.seed)
        fisher_texts = [f"{it.prompt} {it.answer}" for it in lambada]
    entities: set = set()
    if "errors" in suites and kind == "kgfact":
        from mixsd_jax.eval.error_analysis import training_entities

        entities = training_entities(read_records(layout.training_file(cfg.corpus_dir)))
    criterion = None
    if cfg.criterion is not None and splits:
        from mixsd_jax.answers.criteria import criterion_for

        criterion = criterion_for(cfg.criterion, read_records(layout.training_file(cfg.corpus_dir)))
    return Inputs(found, splits, benchmarks, digests, train_files, kl_texts, fisher_texts, entities, kind,
                  criterion, _heldout(cfg, explicit))


def _benchmarks(cfg: EvalConfig, kind: str | None) -> tuple[dict, dict]:
    """The held-out benchmarks' items and files digests (KL's held-out prompts are their items too)."""
    from mixsd_jax.eval import retention

    suites = cfg.suite_set()
    names = list(cfg.benchmarks)
    # KGFunc's unseen operations join the benchmarks when the corpus has them (asked for, they must exist).
    if kind == "kgfunc" and (storage.path(cfg.corpus_dir) / layout.KGFUNC_UNSEEN).is_file():
        names += [] if "kgfunc_unseen" in names else ["kgfunc_unseen"]
    benchmarks, digests = {}, {}
    if suites & {"retention", "kl"}:
        for name in names:
            benchmarks[name] = retention.load_items(name, data_root=cfg.data_root, limit=cfg.limit, seed=cfg.seed,
                                                    corpus_dir=cfg.corpus_dir)
            digests[name] = files_digest(retention.data_files(name, cfg.data_root, cfg.corpus_dir))
    if "retention" in suites and "humaneval" in benchmarks and not cfg.allow_code_execution:
        raise MixsdError("benchmark 'humaneval' executes model-written code: set allow_code_execution (opt-in)")
    return benchmarks, digests


def _train_files(cfg: EvalConfig, explicit: set[str]) -> dict:
    """name -> (path, records) of the training files whose targets the NLL suite scores."""
    from mixsd_jax.data.records import read_records

    suites = cfg.suite_set()
    entries = [split_named(e, "train_files") for e in cfg.train_files]
    if not entries and cfg.corpus_dir and "nll" in suites:
        entries = [("gt", str(layout.training_file(cfg.corpus_dir)))]
    if "nll" in explicit and not entries:
        raise MixsdError("suite 'nll' needs training files (train_files NAME=PATH, or a corpus_dir)")
    train_files = {}
    if "nll" in suites:
        for name, path in entries:
            records = read_records(path)
            if not records:
                raise MixsdError(f"{path}: training file {name!r} has no records")
            train_files[name] = (path, records)
    return train_files


def _heldout(cfg: EvalConfig, explicit: set[str]) -> tuple:
    """(prompts, training entities, GT answer template, {run: target openings}) for the heldout suite."""
    from mixsd_jax.data.records import read_records

    if "heldout" not in cfg.suite_set() or not cfg.corpus_dir:
        if "heldout" in explicit:
            raise MixsdError("suite 'heldout' needs a corpus directory (its training entities and answer template)")
        return ()
    from mixsd_jax.answers.criteria import training_entities as criterion_entities
    from mixsd_jax.eval.heldout import answer_template, general_prompts, target_openings

    train = read_records(layout.training_file(cfg.corpus_dir))
    openings = {name: target_openings(r.assistant for r in read_records(path))
                for name, path in (split_named(e, "train_files") for e in cfg.train_files)}
    return (general_prompts(cfg.heldout_source, data_root=cfg.data_root, limit=cfg.heldout_prompts, seed=cfg.seed),
            criterion_entities(train), answer_template(r.assistant for r in train), openings)


def _kl_texts(benchmarks: dict, cfg: EvalConfig) -> list[tuple[str, str]]:
    from mixsd_jax.eval.benchmarks import MCItem, subset_indices

    texts = []
    for items in benchmarks.values():
        for item in items:
            if isinstance(item, MCItem):
                context, continuation = item.requests()[item.gold]
                texts.append((item.id, (context + continuation).strip()))
            else:
                texts.append((item.id, item.prompt))
    if not texts:
        raise MixsdError("suite 'kl' needs held-out prompts: configure at least one benchmark")
    return [texts[i] for i in subset_indices(len(texts), cfg.kl_texts, cfg.seed)]

"""What each pipeline stage runs: small closures over a stage's settings, called by the runner.

The plan (`plan.py`) decides which stages exist and what they are fingerprinted by; these functions
only do the work, importing the heavy packages (sampling, train, edit, eval) when a stage runs, so
planning and `--dry-run` stay cheap.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from mixsd_jax import config as config_lib
from mixsd_jax import storage
from mixsd_jax.errors import MixsdError
from mixsd_jax.pipeline.config import ExperimentConfig


def corpus_runner(corpus, root: Path) -> Callable[[], dict]:
    def run() -> dict:
        if corpus.kind == "directory":
            return {"corpus": str(root)}
        if corpus.kind == "released":
            from mixsd_jax.data.importer import import_released

            return {"files": import_released(corpus.source, root)}
        from mixsd_jax.data.commands import DEFAULT_PRESET, BuildConfig, build_dataset

        fields = {f.name for f in dataclasses.fields(BuildConfig)}
        build = BuildConfig(**{k: v for k, v in config_lib.to_dict(corpus).items() if k in fields and k != "out"},
                            out=str(root))
        return {"files": build_dataset(corpus.kind, build, corpus.preset or DEFAULT_PRESET[corpus.kind])}

    return run


def generate_runner(gcfg) -> Callable[[], dict]:
    def run() -> dict:
        from mixsd_jax.sampling.generator import generate

        summary = generate(gcfg, progress=True)
        kept_failures = summary.get("rejected", 0) - summary.get("empty_answers", 0) if gcfg.keep_rejected else 0
        trainable = summary.get("accepted", 0) + kept_failures
        if not trainable:
            raise MixsdError(
                f"{summary.get('output')}: no MixSD target passed the verifier for λ={gcfg.lambda_mix:g} "
                f"({summary.get('generations')} generations); nothing to train on. Raise generation.max_retries or "
                "max_new_tokens, use extract_mode=contains, set generation.keep_rejected=true, or drop "
                f"{gcfg.lambda_mix:g} from lambdas"
            )
        return summary

    return run


def edit_runner(ecfg) -> Callable[[], dict]:
    def run() -> dict:
        from mixsd_jax.edit.runner import edit

        return edit(ecfg)

    return run


def train_runner(tcfg, prune_checkpoints: bool = False) -> Callable[[], dict]:
    """`prune_checkpoints` (selection.prune): the run's Orbax checkpoints are deleted once it is
    trained; its exports are what the later stages read."""
    def run() -> dict:
        from mixsd_jax import multihost, storage
        from mixsd_jax.train.loop import train

        summary = train(tcfg, progress=True)
        if prune_checkpoints:
            multihost.barrier(f"trained {tcfg.out}")  # every host's last checkpoint write has ended
            if multihost.is_primary():
                storage.remove(storage.path(tcfg.out) / "checkpoints")
        return summary

    return run


def view_splits(cfg: ExperimentConfig, eval_cls) -> tuple[str, ...]:
    """`eval.splits` (memorization splits to run), when the evaluator has no such key itself."""
    splits = cfg.eval.get("splits")
    if splits is None or "splits" in {f.name for f in dataclasses.fields(eval_cls)}:
        return ()
    if isinstance(splits, str) or not isinstance(splits, (list, tuple)) or not splits:
        raise MixsdError(f"config key 'eval.splits': expected a non-empty list of split names, got {splits!r}")
    if cfg.corpus.kind not in ("kgfact", "mquake", "kgfunc"):
        raise MixsdError(f"config key 'eval.splits': only for kgfact, mquake and kgfunc corpora, not {cfg.corpus.kind!r}")
    from mixsd_jax.data.layout import KGFACT_SPLITS, KGFUNC_SPLITS

    table = KGFUNC_SPLITS if cfg.corpus.kind == "kgfunc" else KGFACT_SPLITS
    for i, name in enumerate(splits):
        if name not in table:
            raise MixsdError(f"config key 'eval.splits[{i}]': unknown split {name!r} (known: {', '.join(table)})")
    return tuple(str(s) for s in splits)


def corpus_view(corpus_dir: Path, view: Path, splits: tuple[str, ...]) -> None:
    """A copy of the corpus holding only the chosen test splits (and the training file), so the
    evaluator runs just those memorization splits."""
    from mixsd_jax.data.layout import KGFACT_SPLITS, KGFUNC_SPLITS, corpus_kind, training_file

    table = KGFUNC_SPLITS if corpus_kind(corpus_dir) == "kgfunc" else KGFACT_SPLITS
    storage.remove(view)
    train = storage.path(training_file(corpus_dir))
    files = [train, *(f for name in splits for f in sorted(corpus_dir.glob(table[name])))]
    for source in files:
        target = view / str(source)[len(str(corpus_dir)):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())


def eval_runner(ecfg, evaluate, corpus_dir: Path, view_splits: tuple[str, ...]) -> Callable[[], dict]:
    def run() -> dict:
        if view_splits:
            from mixsd_jax import multihost

            if multihost.is_primary():  # one writer; the others wait until the copy is complete
                corpus_view(corpus_dir, storage.path(ecfg.corpus_dir), view_splits)
            multihost.barrier("pipeline corpus view")
        return evaluate(ecfg, progress=True)

    return run

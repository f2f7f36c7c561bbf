"""`select_<run>` stages: pick each training run's reported checkpoint by its training recall.

With `selection.every: k` the pipeline saves and exports every k steps of every training run
(`train/<run>/exports/step_N`, HF format), then this stage measures recall on the training facts
at each saved step (the run's answer criterion), applies `selection.rule` (docs/reference.md, Checkpoint selection:
SFT's first peak, MixSD's last, or one rule for all), and points `select/<run>/model` (a relative
symlink; in a bucket, which has no links, a copy committed by its marker) at the chosen export,
which is what the eval stage evaluates. The steps are decoded on the eval stage's mesh and dtypes. `select/<run>/selection.json`
holds the curve, the rule and the step chosen.

The run length (`train.steps` / `train.epochs`) is the budget: the reference also trains for a
fixed number of epochs and selects afterwards.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from mixsd_jax import config as config_lib
from mixsd_jax import storage
from mixsd_jax.errors import MixsdError

# Training facts per corpus kind (the split that asks the training questions themselves).
TRAIN_SPLIT = {"kgfact": "recall", "kgfunc": "in_domain"}


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    every: int = 0  # save, export and measure training recall every `every` steps; 0 = off (report the last)
    rule: str = "reference"  # reference | first_peak | last | best
    max_new_tokens: int = 48
    batch_size: int = 16
    limit: int | None = None  # training facts the curve asks (a seeded subset); None = all
    # Keep only what the report reads: a trained run's Orbax checkpoints are deleted when it ends
    # (its final `hf/` stays), the exports not chosen once it is selected. For studies whose exports
    # fill the disk; a later change of `rule` then finds one step, and extending a run starts over.
    prune: bool = False

    def __post_init__(self):
        from mixsd_jax.eval.selection import RULES

        config_lib.check_range("selection.every", self.every, 0)
        config_lib.check_range("selection.max_new_tokens", self.max_new_tokens, 1)
        config_lib.check_range("selection.batch_size", self.batch_size, 1)
        if self.limit is not None:
            config_lib.check_range("selection.limit", self.limit, 1)
        if self.rule not in RULES:
            raise MixsdError(f"config key 'selection.rule': unknown rule {self.rule!r} (known: {', '.join(RULES)})")


def fingerprint_settings(sel: SelectionConfig) -> dict:
    """What changes a selection's result (`prune` only deletes files afterwards)."""
    return {k: v for k, v in config_lib.to_dict(sel).items() if k != "prune"}


def train_overrides(sel: SelectionConfig) -> dict:
    """Train-section keys the selection needs (a save and an HF export every `every` steps)."""
    return {"save_every": sel.every, "export_every": True} if sel.every else {}


def model_link(exp: Path, run: str) -> Path:
    return exp / "select" / run / "model"


def _point_at(link, chosen) -> None:
    """`link` names the chosen export: a relative symlink swapped in atomically on a local disk; in
    a bucket a copy of its files, the marker last (the eval stage waits for the stage record)."""
    if storage.is_url(link):
        from mixsd_jax.models.checkpoint import copy_export

        copy_export(chosen, link)
        return
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(str(chosen), str(link.parent)), tmp)
    os.replace(tmp, link)  # atomic: the eval stage never sees a half-made link


def selection_runner(run: str, method: str, train_dir: Path, corpus_dir: Path, criterion_name: str | None,
                     sel: SelectionConfig, workdir: Path, decode: dict | None = None) -> Callable[[], dict]:
    decode = decode or {}
    def run_stage() -> dict:
        from mixsd_jax.answers.criteria import criterion_for
        from mixsd_jax.data import layout
        from mixsd_jax.data.records import read_records
        from mixsd_jax.eval import memorization, selection
        from mixsd_jax.files import atomic_write_json
        from mixsd_jax.multihost import barrier, is_primary

        kind = layout.corpus_kind(corpus_dir)
        split = memorization.load_splits(corpus_dir, sel.limit, names=[TRAIN_SPLIT[kind]])[TRAIN_SPLIT[kind]]
        name = criterion_name or f"reference_{split.mode}"
        criterion = criterion_for(name, read_records(layout.training_file(corpus_dir)))
        steps = selection.saved_steps(train_dir)
        if not steps:
            raise MixsdError(f"{train_dir}/exports: no saved steps to select from (selection.every needs "
                             "train.save_every exports; rerun the training stage)")
        print(f"select {run}: training recall at steps {list(steps)}")
        from mixsd_jax.models.sharding import MeshConfig, make_mesh

        mesh = make_mesh(config_lib.from_dict(MeshConfig, decode.get("mesh", {}), prefix="eval.mesh."))
        curve = selection.recall_curve(steps, [(it.id, it.prompt, it.gold) for it in split.items], criterion,
                                       workdir / "items", max_new_tokens=sel.max_new_tokens,
                                       batch_size=sel.batch_size, mesh=mesh,
                                       param_dtype=decode.get("param_dtype", "float32"),
                                       dtype=decode.get("dtype", "float32"))
        index, applied = selection.select_index(sel.rule, [p["accuracy"] for p in curve], method)
        chosen = curve[index]["step"]
        summary = {"run": run, "method": method, "rule": sel.rule, "applied": applied, "criterion": name,
                   "split": split.name, "curve": curve, "chosen_step": chosen, "chosen_index": index,
                   "last_step": curve[-1]["step"], "model": str(steps[chosen])}
        if is_primary():  # every process computed the same curve; one writes it
            _point_at(model_link(workdir.parent.parent, run), steps[chosen])
            atomic_write_json(workdir / "selection.json", summary)
            if sel.prune:
                for step, folder in steps.items():
                    if step != chosen:
                        storage.remove(folder)
        barrier(f"select {run}")
        print(f"select {run}: step {chosen} ({applied}; recall {curve[index]['correct']}/{curve[index]['n']})")
        return summary

    return run_stage

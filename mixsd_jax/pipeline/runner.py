"""Run a plan: skip finished stages, wipe stale ones, record each success in `<exp>/stages/`.

A stage is skipped when `<exp>/stages/<name>.json` says it finished with the same fingerprint and
its outputs exist. A stage is marked `running` (with its fingerprint) before it starts, so a
killed pipeline resumes the stage with the same settings instead of wiping it.

Multi-host: every process runs the same plan; process 0 reads each stage's status from the run
directory (the one thing hosts share: a bucket URL, or a local folder they all mount) and
broadcasts it. Process 0 alone writes `experiment.json`, the stage records, removes
stale outputs and builds the corpus; the stages' own tools follow the same rule for their files
(generate, train, eval). A barrier after each stage makes its outputs visible to every process
before the next stage reads them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from mixsd_jax import config as config_lib
from mixsd_jax import multihost, storage
from mixsd_jax.errors import MixsdError
from mixsd_jax.files import atomic_write_json
from mixsd_jax.pipeline.stage import Plan, Stage


def record_path(plan: Plan, stage: Stage) -> Path:
    return plan.exp_dir / "stages" / f"{stage.name}.json"


def read_record(plan: Plan, stage: Stage) -> dict | None:
    path = record_path(plan, stage)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # written atomically, so only a hand-edited file gets here: treat as absent


def stage_status(plan: Plan, stage: Stage) -> str:
    """done | partial (killed with these settings: resumes) | changed (settings differ) | pending."""
    record = read_record(plan, stage)
    if record is None:
        return "pending"
    if record.get("fingerprint") != stage.fingerprint:
        return "changed"
    if record.get("status") == "done" and all(p.exists() for p in stage.outputs):
        return "done"
    return "partial"


def describe(plan: Plan) -> str:
    lines = [f"experiment {plan.config.name!r} in {plan.exp_dir} (model {plan.config.model})"]
    for i, stage in enumerate(plan.stages, 1):
        lines.append(f"{i:>2}. {stage.name:<28} {stage_status(plan, stage):<8} {stage.fingerprint}  {stage.description}")
    lines.append(f"report: {plan.report}")
    return "\n".join(lines)


def run_plan(plan: Plan, *, log: Callable[[str], None] = print) -> dict:
    """Runs every stage that is not done; returns {stage name: summary or None when skipped}."""
    _join_hosts(plan)
    primary = multihost.is_primary()
    if not primary:
        log = _quiet
    if primary:
        plan.exp_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(plan.exp_dir / "experiment.json", config_lib.to_dict(plan.config))
    results: dict = {}
    total = len(plan.stages)
    for i, stage in enumerate(plan.stages, 1):
        # Process 0 reads the stage's record and tells the others: the run directory is the only
        # thing hosts share, and one reader cannot disagree with itself.
        status = multihost.broadcast_json(stage_status(plan, stage) if primary else None, f"status {stage.name}")
        if status == "done":
            log(f"[{i}/{total}] {stage.name}: done earlier with the same settings, skipped")
            results[stage.name] = None
            continue
        record = read_record(plan, stage)
        base = {"name": stage.name, "fingerprint": stage.fingerprint, "reset": stage.reset, "parts": stage.parts}
        if primary:
            _clean_stale(plan, stage, record, log)
            atomic_write_json(record_path(plan, stage), {**base, "status": "running"})
        multihost.barrier(f"pipeline {stage.name} start")  # stale outputs are gone on every host's view
        verb = "resuming" if status == "partial" else "running"
        log(f"[{i}/{total}] {stage.name}: {verb} ({stage.description})")
        started = time.time()
        if stage.name == "corpus":  # the builders know nothing of hosts: one process writes the files
            summary = stage.run() if primary else None
        else:
            summary = stage.run()
        multihost.barrier(f"pipeline {stage.name} done")
        missing = multihost.broadcast_json([str(p) for p in stage.outputs if not p.exists()] if primary else None,
                                           f"outputs {stage.name}")
        if missing:
            raise MixsdError(f"stage {stage.name}: finished but did not write {missing[0]}")
        seconds = round(time.time() - started, 2)
        if primary:
            atomic_write_json(record_path(plan, stage), {**base, "status": "done", "seconds": seconds,
                                                         "outputs": [str(p) for p in stage.outputs]})
        log(f"[{i}/{total}] {stage.name}: done in {seconds:.1f}s")
        results[stage.name] = summary
    return results


def _join_hosts(plan: Plan) -> None:
    """On a multi-host slice every process joins before the first stage touches a device (the
    trainer's `distributed` section or the MIXSD_* environment); single-process otherwise."""
    cfg = plan.config
    if all(stage_status(plan, s) == "done" for s in plan.stages):
        return
    multihost.join_writing_to(cfg.distributed, cfg.out_dir, "out_dir", cfg.storage.shared_local)


def _quiet(_: str) -> None:
    """Log sink of non-primary processes: process 0 tells the user what happens."""


def _clean_stale(plan: Plan, stage: Stage, record: dict | None, log) -> None:
    """Old outputs the stage's tool would refuse to resume are removed before it runs."""
    if record is None or not stage.owns_workdir:
        return
    if record.get("reset") != stage.reset:
        _remove(plan, stage.workdir, log)
        return
    old_parts = record.get("parts") or {}
    for name, fingerprint in old_parts.items():
        if stage.parts.get(name) != fingerprint:
            for pattern in stage.part_dirs:
                _remove(plan, stage.workdir / pattern.format(name=name), log)


def _remove(plan: Plan, path: Path, log) -> None:
    if not path.exists():
        return
    if not str(path).startswith(str(plan.exp_dir).rstrip("/") + "/"):
        raise MixsdError(f"pipeline: refusing to delete {path}, which is outside the experiment folder {plan.exp_dir}")
    log(f"  removing outputs from other settings: {path}")
    storage.remove(path)


def report_text(plan: Plan) -> str:
    """The evaluator's table, the plot path and (last line) where the report is."""
    lines = []
    if plan.report.is_file():
        # report.md's tables as written (results.json has its keys sorted, report.md keeps run order)
        body = [line for line in plan.report.read_text().splitlines() if not line.startswith(("# ", "!["))]
        lines.append("\n".join(body).strip() + "\n")
    lines += training_lines(plan)
    times = stage_times(plan)
    if times:
        lines.append("wall time per stage (this experiment's last run of each): "
                     + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in times.items()))
    from mixsd_jax.eval.report import PLOT_FORGETTING, PLOT_TRADEOFF

    for plot in (plan.report.parent / PLOT_TRADEOFF, plan.report.parent / PLOT_FORGETTING):
        if plot.is_file():
            lines.append(f"plot: {plot}")
    lines.append(f"report: {plan.report}")
    return "\n".join(lines)


def stage_times(plan: Plan) -> dict[str, float]:
    """{stage: seconds} from the records of the stages that finished."""
    out = {}
    for stage in plan.stages:
        record = read_record(plan, stage)
        if record and record.get("status") == "done" and "seconds" in record:
            out[stage.name] = float(record["seconds"])
    return out


def training_lines(plan: Plan) -> list[str]:
    """What each tuned checkpoint was trained on: records kept by the verifier, steps taken."""
    lines = []
    for stage in plan.stages:
        summary = stage.workdir / "summary.json"
        if stage.name.startswith("edit_") and summary.is_file():
            edit = json.loads(summary.read_text())
            lines.append(f"{stage.name[len('edit_'):]}: edited {edit['requests']} facts into layers {edit['layers']} "
                         f"(efficacy {edit['efficacy_before']:.2f} -> {edit['efficacy']:.2f})")
            continue
        if not stage.name.startswith("train_") or not summary.is_file():
            continue
        train = json.loads(summary.read_text())
        line = f"{stage.name[len('train_'):]}: trained {train['steps']} steps on {train['records']} records"
        generated = storage.path(train["data"]).with_suffix(".summary.json")
        if generated.is_file():
            gen = json.loads(generated.read_text())
            line += f" ({gen['accepted']} of {gen['generations']} MixSD targets passed the verifier)"
        selected = plan.exp_dir / "select" / stage.name[len("train_"):] / "selection.json"
        if selected.is_file():
            sel = json.loads(selected.read_text())
            curve = " ".join(f"{p['step']}:{p['correct']}/{p['n']}" for p in sel["curve"])
            line += (f"; selected step {sel['chosen_step']} ({sel['applied']}; training recall by step, "
                     f"{sel['criterion']}: {curve})")
        lines.append(line)
    return lines

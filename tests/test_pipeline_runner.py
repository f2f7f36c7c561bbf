"""The runner's bookkeeping on plain file-writing stages: skip what is done, resume what was
killed, wipe outputs of other settings, and only the changed parts of a stage."""

import json
from pathlib import Path

import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.pipeline.config import ExperimentConfig
from mixsd_jax.pipeline.stage import Plan, Stage
from mixsd_jax.pipeline.runner import read_record, run_plan, stage_status


def _writer(path: Path, text: str, calls: list):
    def run():
        calls.append(path.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return {"wrote": str(path)}

    return run


def _plan(exp: Path, calls: list, fingerprint="a", reset="r", parts=None, text="x") -> Plan:
    out = exp / "work" / "out.txt"
    stage = Stage(name="work", fingerprint=fingerprint, reset=reset, workdir=exp / "work", outputs=(out,), inputs=(),
                  run=_writer(out, text, calls), parts=parts or {}, part_dirs=("items/{name}",))
    return Plan(config=ExperimentConfig(), exp_dir=exp, model_dir=exp, stages=(stage,), report=exp / "report.md")


def test_done_stages_are_skipped_and_changed_ones_rerun(tmp_path):
    calls: list = []
    plan = _plan(tmp_path, calls)
    assert stage_status(plan, plan.stages[0]) == "pending"
    run_plan(plan, log=lambda _: None)
    assert calls == ["out.txt"] and stage_status(plan, plan.stages[0]) == "done"
    run_plan(plan, log=lambda _: None)
    assert calls == ["out.txt"]  # skipped
    (tmp_path / "work" / "out.txt").unlink()  # outputs gone: run again
    run_plan(plan, log=lambda _: None)
    assert len(calls) == 2
    changed = _plan(tmp_path, calls, fingerprint="b")
    assert stage_status(changed, changed.stages[0]) == "changed"
    run_plan(changed, log=lambda _: None)
    assert len(calls) == 3 and read_record(changed, changed.stages[0])["fingerprint"] == "b"


def test_a_new_reset_key_wipes_old_outputs_but_a_killed_run_keeps_them(tmp_path):
    calls: list = []
    run_plan(_plan(tmp_path, calls), log=lambda _: None)
    leftover = tmp_path / "work" / "old_checkpoint"
    leftover.mkdir()
    run_plan(_plan(tmp_path, calls, fingerprint="b"), log=lambda _: None)  # same reset key: continue in place
    assert leftover.exists()
    run_plan(_plan(tmp_path, calls, fingerprint="c", reset="s"), log=lambda _: None)
    assert not leftover.exists()

    def killed():
        raise KeyboardInterrupt

    plan = _plan(tmp_path, calls, fingerprint="d", reset="t")
    stage = plan.stages[0]
    partial = tmp_path / "work" / "partial"
    broken = Plan(plan.config, plan.exp_dir, plan.model_dir, (Stage(**{**stage.__dict__, "run": killed}),), plan.report)
    with pytest.raises(KeyboardInterrupt):
        run_plan(broken, log=lambda _: None)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("half")
    assert stage_status(plan, stage) == "partial"
    logs: list = []
    run_plan(plan, log=logs.append)
    assert partial.exists() and any("resuming" in line for line in logs)


def test_only_changed_parts_are_wiped(tmp_path):
    calls: list = []
    run_plan(_plan(tmp_path, calls, parts={"base": "1", "sft": "2", "old": "3"}), log=lambda _: None)
    for name in ("base", "sft", "old"):
        (tmp_path / "work" / "items" / name).mkdir(parents=True)
    run_plan(_plan(tmp_path, calls, fingerprint="b", parts={"base": "1", "sft": "9"}), log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "work" / "items").iterdir()) == ["base"]
    record = json.loads((tmp_path / "stages" / "work.json").read_text())
    assert record["parts"] == {"base": "1", "sft": "9"} and record["status"] == "done"


def test_never_deletes_outside_the_experiment(tmp_path):
    calls: list = []
    outside = tmp_path / "user_corpus"
    outside.mkdir()
    exp = tmp_path / "exp"
    out = outside / "out.txt"
    stage = Stage(name="work", fingerprint="a", reset="r", workdir=outside, outputs=(out,), inputs=(),
                  run=_writer(out, "x", calls))
    run_plan(Plan(ExperimentConfig(), exp, exp, (stage,), exp / "r.md"), log=lambda _: None)
    moved = Stage(**{**stage.__dict__, "fingerprint": "b", "reset": "s"})
    with pytest.raises(MixsdError, match="outside the experiment"):
        run_plan(Plan(ExperimentConfig(), exp, exp, (moved,), exp / "r.md"), log=lambda _: None)
    assert out.exists()

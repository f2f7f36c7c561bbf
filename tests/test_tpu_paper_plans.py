"""run/tpu_paper_plans.py: the committed plans' `same as` lines against the lines they copy."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("tpu_paper_plans", ROOT / "run" / "tpu_paper_plans.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_twin_with_fewer_micro_batches_does_proportionally_less_work_per_step():
    plans = _script()
    lines = [json.loads(x) for x in (ROOT / "configs" / "paper" / "tpu_plans.jsonl").read_text().splitlines()]
    compiled = {(x["config"], x["model"]): x for x in lines if x["kernel"] == "train_step" and "same_as" not in x}
    twins = [x for x in lines if "same_as" in x]
    assert any(x["shapes"]["grad_accum"] != compiled[(x["same_as"], x["model"])]["shapes"]["grad_accum"] for x in twins)
    for line in twins:
        twin = compiled[(line["same_as"], line["model"])]
        ratio = line["shapes"]["grad_accum"] / twin["shapes"]["grad_accum"]
        for key in plans.PER_STEP_ESTIMATES:
            assert abs(line[key] - ratio * twin[key]) <= 1e-9 * twin[key], (line["config"], key)
        for key in ("flops", "bytes_accessed", "peak_bytes", "tokens_per_s_est", "mfu_est"):  # per loop body, or rates
            assert line[key] == twin[key], (line["config"], key)

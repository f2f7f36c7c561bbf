"""run/tpu_paper_plans.py: the committed plans cover every kernel of every paper config, and their
`same as` lines agree with the lines they copy."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "configs" / "paper" / "tpu_plans.jsonl"


def _script():
    spec = importlib.util.spec_from_file_location("tpu_paper_plans", ROOT / "run" / "tpu_paper_plans.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines():
    return [json.loads(x) for x in PLANS.read_text().splitlines()]


def test_every_kernel_family_a_paper_config_runs_is_planned_on_its_slice():
    from mixsd_jax.bench import memory

    plans, lines = _script(), _lines()
    assert not [x for x in lines if "error" in x]
    planned = {(x["config"], x["model"], plans.family(x["kernel"])) for x in lines}
    missing = []
    for name, path, overrides, model, topology in plans.cases(None):
        assert topology is not None, (name, model)
        plan = memory.load_plan_config(path, overrides)
        missing += [(name, model, k) for k in memory.KERNELS if plans.runs(plan, k) and (name, str(model), k) not in planned]
    assert not missing


def test_a_same_as_line_is_its_twins_program_and_a_train_step_scales_with_its_micro_batches():
    plans, lines = _script(), _lines()
    compiled = {(x["config"], x["model"], x["kernel"]): x for x in lines if "same_as" not in x}
    twins = [x for x in lines if "same_as" in x]
    steps = [x for x in twins if x["kernel"] == "train_step"]
    assert any(x["shapes"]["grad_accum"] != compiled[(x["same_as"], x["model"], "train_step")]["shapes"]["grad_accum"]
               for x in steps)
    for line in twins:
        twin = compiled[(line["same_as"], line["model"], line["kernel"])]
        for key in ("peak_bytes", "flops", "bytes_accessed", "mesh", "topology", "fits"):  # one program
            assert line[key] == twin[key], (line["config"], line["kernel"], key)
        if line["kernel"] != "train_step":
            continue
        ratio = line["shapes"]["grad_accum"] / twin["shapes"]["grad_accum"]
        for key in plans.PER_STEP_ESTIMATES:
            assert abs(line[key] - ratio * twin[key]) <= 1e-9 * twin[key], (line["config"], key)
        for key in ("tokens_per_s_est", "mfu_est"):  # rates
            assert line[key] == twin[key], (line["config"], key)


def test_configs_that_differ_only_in_schedule_and_data_share_a_signature_and_others_do_not():
    from mixsd_jax.bench import memory

    plans = _script()
    paper = ROOT / "configs" / "paper"
    small, funcs = (memory.load_plan_config(str(paper / f"{c}_qwen3_1p7b.yaml"), []) for c in ("kgfact_small", "kgfunc"))
    for kernel in ("train_step", "opsd_step", "generate", "eval_decode", "export"):
        assert plans.signature(small, kernel, "qwen3-1.7b", "v5e:2x4") == plans.signature(funcs, kernel, "qwen3-1.7b", "v5e:2x4")
    fewer = memory.load_plan_config(str(paper / "kgfact_small_qwen3_1p7b.yaml"), ["generation.batch_size=8"])
    assert plans.signature(fewer, "generate", "qwen3-1.7b", "v5e:2x4") != plans.signature(small, "generate", "qwen3-1.7b", "v5e:2x4")
    assert plans.signature(fewer, "train_step", "qwen3-1.7b", "v5e:2x4") == plans.signature(small, "train_step", "qwen3-1.7b", "v5e:2x4")
    longer = memory.load_plan_config(str(paper / "kgfact_small_qwen3_1p7b.yaml"), ["train.max_seq_len=4096"])
    assert plans.signature(longer, "train_step", "qwen3-1.7b", "v5e:2x4") != plans.signature(small, "train_step", "qwen3-1.7b", "v5e:2x4")

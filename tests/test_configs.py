"""Every shipped config loads and builds its pipeline plan (on tiny stand-in models), and the
paper configs carry the reference's sweep and training recipe (docs/reference.md, SFT and MixSD)."""

import dataclasses
from pathlib import Path

import pytest

from mixsd_jax.pipeline.config import load_experiment
from mixsd_jax.pipeline.plan import build_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = sorted(p for p in (CONFIGS / "paper").glob("*.yaml") if not p.name.startswith("scaling_"))
SCALING = [*sorted((CONFIGS / "paper").glob("scaling_*.yaml")), CONFIGS / "scaling_cpu.yaml"]


def _stand_in(name: str, request) -> Path:
    family = "llama" if "llama" in name else "qwen3"
    return request.getfixturevalue(f"tiny_{family}_dir")


def _simpleqa_csv(tmp_path) -> Path:
    path = tmp_path / "simple_qa_test_set.csv"
    path.write_text('metadata,problem,answer\n"{\'topic\': \'Art\'}",Who painted the Blue Door?,Ana Vel\n')
    return path


def _plan(path: Path, request, tmp_path):
    overrides = [f"model={_stand_in(path.name, request)}", f"out_dir={tmp_path / 'exp'}"]
    if path.name.startswith("simpleqa"):
        overrides.append(f"corpus.source={_simpleqa_csv(tmp_path)}")
    if path.name.startswith("mquake"):  # a small file in MQuAKE-CF-3k-v2's format
        overrides.append(f"corpus.source={Path(__file__).parent / 'fixtures' / 'mquake_tiny.json'}")
    return build_plan(load_experiment(path, overrides))


def test_all_paper_settings_are_there():
    names = {p.stem for p in PAPER}
    corpora = ("kgfact_small", "kgfact_large", "kgfunc", "simpleqa", "mquake")
    models = ("qwen3_1p7b", "qwen3_4b", "qwen3_8b", "llama3p2_1b")
    assert names == {f"{c}_{m}" for c in corpora for m in models}


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_config_builds_its_plan(path, request, tmp_path):
    cfg = load_experiment(path)
    assert cfg.lambdas == (0.0, 0.3, 0.5, 0.7) and cfg.temperatures == (0.0, 0.6)
    # MEMIT on kgfact-small and MQuAKE, as the reference ran it (its kernels fit each slice: configs/paper/tpu_plans.jsonl)
    memit = path.name.startswith(("kgfact_small", "mquake"))
    assert cfg.methods == ("base", "sft", "opsd", "mixsd") + (("memit",) if memit else ())
    plan = _plan(path, request, tmp_path)
    names = [s.name for s in plan.stages]
    assert len(names) == 1 + 8 + 2 + 8 + memit + 1  # corpus, 8 generations, SFT, OPSD, 8 MixSD runs, (MEMIT,) eval
    opsd = plan.stage("train_opsd").settings
    assert (opsd.method, opsd.batch_size, opsd.opsd.divergence, opsd.opsd.max_new_tokens) == ("opsd", 16, "forward", 8192)
    assert "train_mixsd_l0p7_t0p6" in names and "generate_mixsd_l0" in names
    gen = plan.stage("generate_mixsd_l0p5_t0p6").settings
    assert (gen.lambda_mix, gen.temperature, gen.topk, gen.max_new_tokens) == (0.5, 0.6, 64, 8192)
    if "qwen3_1p7b" in path.name:  # 24 pairs fit a v5e:2x4's chips (configs/paper/tpu_plans.jsonl), 64 do not
        assert gen.batch_size == 24
    if "qwen3_4b" in path.name:  # 32 pairs over 4-chip tensor groups fit a v5e:4x4's chips, 64 replicated do not
        assert (gen.batch_size, gen.mesh.tensor) == (32, 4)
    train = plan.stage("train_sft").settings
    assert (train.lr, train.weight_decay, train.b1, train.b2, train.eps, train.clip_norm) == (1e-5, 0.01, 0.9, 0.95, 1e-8, 1.0)
    if path.name.startswith(("kgfact", "mquake")):  # MQuAKE trains on the KGFact recipe (same record format)
        assert (train.batch_size, train.epochs, train.warmup_steps, train.schedule) == (20, 30, 0, "constant")
        assert gen.preset == "knowledge"
    else:
        assert (train.batch_size, train.warmup_steps) == (16, 20)
    if path.name.startswith("kgfunc"):
        assert train.steps == 100 and gen.preset == "math_operations" and gen.limit == 1600


@pytest.mark.parametrize("name", ["demo.yaml", "demo_quick.yaml", "study_cpu.yaml"])
def test_demo_configs_build_their_plans(name, tiny_llama_dir, tmp_path):
    from mixsd_jax.answers.criteria import DEMO_CRITERION

    path = CONFIGS / name
    cfg = load_experiment(path)
    assert cfg.model == "smollm2-135m-instruct"
    # One criterion for the run (the verifier and the scorer), convergence selection, generative forgetting.
    assert cfg.criterion == DEMO_CRITERION and "extract_mode" not in cfg.generation
    assert cfg.selection.every > 0 and cfg.selection.rule == "reference"
    assert {"memorization", "heldout", "kl"} <= set(cfg.eval["suites"])
    plan = build_plan(load_experiment(path, [f"model={tiny_llama_dir}", f"out_dir={tmp_path / 'exp'}"]))
    assert plan.stages[0].name == "corpus" and plan.stages[-1].name == "eval"
    assert any(s.name.startswith("train_mixsd") for s in plan.stages)
    assert any(s.name.startswith("select_sft") for s in plan.stages)
    if name == "study_cpu.yaml":
        assert cfg.seeds == (1, 2, 3) and cfg.lambdas == (0.0, 0.3)
        assert len([s for s in plan.stages if s.name.startswith("train_")]) == 9
        assert cfg.eval["benchmarks"] == ["arc_easy"] and cfg.eval["limit"] >= 500  # every bundled question


def test_memorization_on_simpleqa_is_refused_before_any_work(tiny_qwen3_dir, tmp_path):
    from mixsd_jax.errors import MixsdError

    path = CONFIGS / "paper" / "simpleqa_qwen3_4b.yaml"
    overrides = [f"model={tiny_qwen3_dir}", f"out_dir={tmp_path / 'exp'}", f"corpus.source={_simpleqa_csv(tmp_path)}",
                 "eval.suites=[memorization, retention]"]
    with pytest.raises(MixsdError, match="'eval.suites'"):
        build_plan(load_experiment(path, overrides))


def _stand_in_study(path: Path, request, tmp_path):
    """The study of a scaling config with each model replaced by a tiny stand-in (names and
    per-model sections kept)."""
    from mixsd_jax.pipeline.study import build_study

    cfg = load_experiment(path, [f"out_dir={tmp_path / 'exp'}"])
    models = []
    for raw in cfg.models:
        entry = {"model": raw} if isinstance(raw, str) else dict(raw)
        entry.setdefault("name", entry["model"])
        entry["model"] = str(_stand_in(entry["name"], request))
        models.append(entry)
    return cfg, build_study(dataclasses.replace(cfg, models=tuple(models)))


def test_scaling_configs_are_there():
    assert [p.name for p in SCALING] == ["scaling_llama3p2_kgfact_small.yaml", "scaling_qwen3_kgfact_small.yaml",
                                         "scaling_cpu.yaml"]


@pytest.mark.parametrize("path", SCALING, ids=[p.stem for p in SCALING])
def test_scaling_config_builds_its_study(path, request, tmp_path):
    cfg, study = _stand_in_study(path, request, tmp_path)
    expected = {
        "scaling_qwen3_kgfact_small": ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b-instruct-2507", "qwen3-8b"],
        "scaling_llama3p2_kgfact_small": ["llama-3.2-1b-instruct", "llama-3.2-3b-instruct"],
        "scaling_cpu": ["smollm2-135m-instruct", "gemma3-270m"],
    }[path.stem]
    assert list(study.plans) == expected
    memit = ("memit",) if path.stem == "scaling_cpu" else ()
    assert cfg.methods == ("base", "sft", "mixsd", *memit) and cfg.lambdas == (0.0, 0.3) and cfg.temperatures == (0.0,)
    assert cfg.seeds == (1, 2, 3)
    assert [s.name for s in study.corpus.stages] == ["corpus"]
    for name, plan in study.plans.items():
        names = [s.name for s in plan.stages]
        assert "corpus" not in names and names[-1] == "eval"
        assert len([n for n in names if n.startswith("train_")]) == 9  # (SFT + 2 λ) × 3 seeds
        assert len([n for n in names if n.startswith("generate_")]) == 6
        assert [n for n in names if n.startswith("edit_")] == ["edit_memit_s1"] * bool(memit)  # one deterministic edit
        assert plan.exp_dir == study.out_dir / name
        assert plan.stage("train_sft_s1").settings.data.startswith(str(study.out_dir / "corpus" / ""))
        if path.stem == "scaling_cpu":
            continue
        train, gen = plan.stage("train_sft_s1").settings, plan.stage("generate_mixsd_l0p3_s1").settings
        assert (train.batch_size, train.epochs, train.lr, train.grad_accum, train.remat) == (20, 30, 1e-5, 5, "full")
        assert gen.seed == 1 and train.seed == 1 and gen.max_new_tokens == 8192
        big = name == "qwen3-8b"  # the 8B model's paper-config decode settings (configs/paper/README.md)
        # What fits their slice (configs/paper/README.md): pairs and the generation's tensor axis.
        pairs, tensor = {"qwen3-8b": (8, 8), "qwen3-1.7b": (24, 1), "qwen3-4b-instruct-2507": (32, 4), "qwen3-0.6b": (16, 1),
                         "llama-3.2-3b-instruct": (16, 1)}.get(name, (64, 1))
        assert gen.batch_size == pairs and gen.mesh.tensor == tensor
        assert plan.stage("eval").settings.batch_size == (24 if big else 32)
    if path.stem == "scaling_cpu":
        assert cfg.criterion is not None and cfg.selection.every > 0
        assert any(s.name.startswith("select_") for s in study.plans["gemma3-270m"].stages)


@pytest.mark.parametrize("path", SCALING, ids=[p.stem for p in SCALING])
def test_scaling_configs_name_registry_models(path):
    """Each study model is a registry name (so $MIXSD_MODELS_DIR or the embedded wheels resolve it)."""
    from mixsd_jax.models.known_shapes import known_model_config
    from mixsd_jax.models.registry import EMBEDDED, LOCAL_MODELS

    names = [raw if isinstance(raw, str) else raw["model"] for raw in load_experiment(path).models]
    unknown = [n for n in names if n not in {*EMBEDDED, *LOCAL_MODELS}]
    assert unknown == [], unknown
    # `mixsd bench memory` plans every size of the paper studies without weights
    if path.stem in ("scaling_qwen3_kgfact_small", "scaling_llama3p2_kgfact_small"):
        assert all(known_model_config(n) is not None for n in names)

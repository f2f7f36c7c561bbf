"""The stage graph: which stages exist, which fingerprints a setting touches, and bad input caught
before any expensive work (plans are built on a tiny real model; nothing is run)."""

from pathlib import Path

import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.pipeline.config import load_experiment
from mixsd_jax.pipeline.plan import build_plan, mixsd_run_name


def _plan(model_dir, tmp_path, *overrides):
    cfg = load_experiment(None, [f"model={model_dir}", f"out_dir={tmp_path / 'exp'}", "corpus.preset=tiny", *overrides])
    return build_plan(cfg)


def _fps(plan):
    return {s.name: s.fingerprint for s in plan.stages}


def test_stages_follow_methods_and_sweep(tiny_llama_dir, tmp_path):
    plan = _plan(tiny_llama_dir, tmp_path, "lambdas=[0.3, 0.5]", "temperatures=[0, 0.6]")
    assert [s.name for s in plan.stages] == [
        "corpus",
        "generate_mixsd_l0p3", "generate_mixsd_l0p5", "generate_mixsd_l0p3_t0p6", "generate_mixsd_l0p5_t0p6",
        "train_sft",
        "train_mixsd_l0p3", "train_mixsd_l0p5", "train_mixsd_l0p3_t0p6", "train_mixsd_l0p5_t0p6",
        "eval",
    ]
    assert plan.stage("train_sft").inputs == ("corpus",)
    assert plan.stage("train_mixsd_l0p5_t0p6").inputs == ("generate_mixsd_l0p5_t0p6",)
    # SFT trains on the corpus's ground truth; MixSD on the generated file of its λ and T.
    assert plan.stage("train_sft").outputs[0].parent.parent.name == "sft"
    gen = plan.stage("generate_mixsd_l0p5_t0p6").outputs[0]
    assert gen.name == "train_messages_mix_" + tiny_llama_dir.name.lower() + "_l0p5_t0p6_n1_topk64.jsonl"
    assert set(plan.stage("eval").parts) == {"base", "sft", "mixsd_l0p3", "mixsd_l0p5", "mixsd_l0p3_t0p6",
                                              "mixsd_l0p5_t0p6"}
    assert plan.report == tmp_path / "exp" / "eval" / "report.md"
    assert mixsd_run_name(0.0, 0.0) == "mixsd_l0"


def test_only_sft_and_base_needs_no_generation(tiny_llama_dir, tmp_path):
    plan = _plan(tiny_llama_dir, tmp_path, "methods=[base, sft]", "lambdas=[]")
    assert [s.name for s in plan.stages] == ["corpus", "train_sft", "eval"]
    base_only = _plan(tiny_llama_dir, tmp_path, "methods=[base]")
    assert [s.name for s in base_only.stages] == ["corpus", "eval"]


def _changed(before, after):
    return sorted(name for name in after if before.get(name) != after[name])


def test_each_setting_changes_only_the_stages_it_affects(tiny_llama_dir, tmp_path):
    base = _fps(_plan(tiny_llama_dir, tmp_path))
    assert base == _fps(_plan(tiny_llama_dir, tmp_path))  # stable across builds
    assert _changed(base, _fps(_plan(tiny_llama_dir, tmp_path, "eval.limit=7"))) == ["eval"]
    assert _changed(base, _fps(_plan(tiny_llama_dir, tmp_path, "train.lr=3e-4"))) == [
        "eval", "train_mixsd_l0p3", "train_sft"]
    assert _changed(base, _fps(_plan(tiny_llama_dir, tmp_path, "generation.max_new_tokens=9"))) == [
        "eval", "generate_mixsd_l0p3", "train_mixsd_l0p3"]
    assert _changed(base, _fps(_plan(tiny_llama_dir, tmp_path, "corpus.seed=7"))) == sorted(base)
    # Speed-only generation settings and logging do not re-run anything.
    assert _changed(base, _fps(_plan(tiny_llama_dir, tmp_path, "generation.batch_size=3", "train.log_every=5"))) == []
    # A second λ adds its own stages and leaves the others' fingerprints alone (eval gains a part).
    more = _fps(_plan(tiny_llama_dir, tmp_path, "lambdas=[0.3, 0.7]"))
    assert _changed(base, more) == ["eval", "generate_mixsd_l0p7", "train_mixsd_l0p7"]


def test_more_steps_continue_training_but_new_lr_restarts_it(tiny_llama_dir, tmp_path):
    base = _plan(tiny_llama_dir, tmp_path, "train.steps=4").stage("train_sft")
    longer = _plan(tiny_llama_dir, tmp_path, "train.steps=8").stage("train_sft")
    other_lr = _plan(tiny_llama_dir, tmp_path, "train.steps=4", "train.lr=1e-3").stage("train_sft")
    assert longer.fingerprint != base.fingerprint and longer.reset == base.reset
    assert other_lr.reset != base.reset


def test_the_model_is_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("MIXSD_MODELS_DIR", raising=False)
    cfg = load_experiment(None, [f"model={tmp_path / 'no_such_model'}", f"out_dir={tmp_path / 'exp'}"])
    with pytest.raises(MixsdError, match="no_such_model"):
        build_plan(cfg)
    cfg = load_experiment(None, ["model=qwen3-8b", f"out_dir={tmp_path / 'exp'}"])
    with pytest.raises(MixsdError, match="MIXSD_MODELS_DIR"):
        build_plan(cfg)
    assert not (tmp_path / "exp").exists()  # nothing was written


@pytest.mark.parametrize(
    "override, key",
    [
        ("generation.input=x.jsonl", "generation.input"),
        ("train.out=elsewhere", "train.out"),
        ("eval.tuned=[a=b]", "eval.tuned"),
        ("train.lrr=1", "train.lrr"),
        ("generation.lambda_mix=0.5", "generation.lambda_mix"),
        ("generation.topk=0", "topk"),
        ("eval.suites=[memorisation]", "suites"),
        ("eval.splits=[recall, hop9]", "eval.splits[1]"),
    ],
)
def test_bad_stage_settings_fail_at_plan_time(tiny_llama_dir, tmp_path, override, key):
    with pytest.raises(MixsdError) as err:
        _plan(tiny_llama_dir, tmp_path, override)
    assert f"'{key}'" in str(err.value)
    assert not (tmp_path / "exp").exists()


def test_a_user_corpus_directory_is_used_in_place(tiny_llama_dir, tmp_path):
    from mixsd_jax.data.kgfact import build_kgfact

    build_kgfact(tmp_path / "mine", preset="tiny", seed=1)
    plan = _plan(tiny_llama_dir, tmp_path, "corpus.kind=directory", f"corpus.source={tmp_path / 'mine'}")
    corpus = plan.stage("corpus")
    assert corpus.outputs == (tmp_path / "mine" / "atomic_sft" / "train_messages.jsonl",)
    assert not corpus.owns_workdir  # never wiped by the runner
    with pytest.raises(MixsdError, match="corpus.source"):
        _plan(tiny_llama_dir, tmp_path, "corpus.kind=directory", f"corpus.source={tmp_path / 'nothing'}")


@pytest.mark.parametrize(
    "line, expected",
    [
        ("methods: [sft, ppo]", "unknown method 'ppo'"),
        ("lambdas: []", "'lambdas': empty"),
        ("model: /nowhere/model", "/nowhere/model"),
    ],
)
def test_the_command_reports_bad_input_in_one_line(tmp_path, capsys, line, expected):
    from mixsd_jax.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(f"out_dir: {tmp_path / 'exp'}\n{line}\n")
    assert main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err
    assert not (tmp_path / "exp").exists()


def test_dry_run_prints_the_plan(tiny_llama_dir, tmp_path, capsys):
    from mixsd_jax.cli import main

    assert main(["pipeline", "--config", str(_config_file(tmp_path, tiny_llama_dir)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "train_mixsd_l0p3" in out and "pending" in out
    assert out.rstrip().splitlines()[-1] == f"report: {tmp_path / 'exp' / 'eval' / 'report.md'}"
    assert not (tmp_path / "exp").exists()


def _config_file(tmp_path, model_dir):
    path = tmp_path / "exp.yaml"
    path.write_text(f"out_dir: {tmp_path / 'exp'}\nmodel: {model_dir}\ncorpus: {{kind: kgfact, preset: tiny}}\n")
    return path


def test_memit_is_an_edit_stage_evaluated_like_a_training_run(tiny_llama_dir, tmp_path):
    plan = _plan(tiny_llama_dir, tmp_path, "methods=[base, sft, memit]", "lambdas=[]")
    assert [s.name for s in plan.stages] == ["corpus", "train_sft", "edit_memit", "eval"]
    edit = plan.stage("edit_memit")
    assert edit.inputs == ("corpus",) and edit.outputs[0] == tmp_path / "exp" / "train" / "memit" / "hf" / "config.json"
    assert edit.settings.data == str(plan.stage("corpus").outputs[0])
    ecfg = plan.stage("eval").settings
    assert f"memit={tmp_path / 'exp' / 'train' / 'memit' / 'hf'}" in ecfg.tuned
    assert "memit=MEMIT" in ecfg.labels and set(plan.stage("eval").parts) == {"base", "sft", "memit"}
    base = _fps(plan)
    changed = _fps(_plan(tiny_llama_dir, tmp_path, "methods=[base, sft, memit]", "lambdas=[]", "memit.layers=[0]"))
    assert _changed(base, changed) == ["edit_memit", "eval"]
    # Selection by training recall picks among checkpoints; an edit has one model, evaluated as is.
    seeded = _plan(tiny_llama_dir, tmp_path, "methods=[base, sft, memit]", "lambdas=[]", "seeds=[1, 2]")
    assert [s.name for s in seeded.stages] == ["corpus", "train_sft_s1", "train_sft_s2", "edit_memit_s1", "eval"]
    selected = _plan(tiny_llama_dir, tmp_path, "methods=[base, sft, memit]", "lambdas=[]", "selection.every=2")
    assert "select_memit" not in [s.name for s in selected.stages]
    assert "edit_memit" in selected.stage("eval").inputs and "select_sft" in selected.stage("eval").inputs


@pytest.mark.parametrize("overrides, message", [
    (("memit.v_stepz=3",), "unknown config key 'memit.v_stepz'"),
    (("memit.out=x",), "config key 'memit.out': set by the pipeline"),
    (("corpus.kind=kgfunc",), "MEMIT edits a subject's facts"),
])
def test_memit_settings_are_checked_at_plan_time(tiny_llama_dir, tmp_path, overrides, message):
    with pytest.raises(MixsdError, match=message):
        _plan(tiny_llama_dir, tmp_path, "methods=[base, memit]", *overrides)


_SIMPLEQA_CSV = Path(__file__).parent.parent.parent / "shared/benchmarks/simpleqa/simple_qa_test_set.csv"


@pytest.mark.parametrize("config", [
    "kgfact_small_qwen3_8b",
    pytest.param("simpleqa_llama3p2_1b", marks=pytest.mark.skipif(
        not _SIMPLEQA_CSV.is_file(), reason="../shared/benchmarks/simpleqa not present (the config's corpus source)")),
])
def test_a_paper_config_dry_runs_without_its_weights(config, tmp_path, monkeypatch, capsys):
    """A user plans before downloading: the paper model's known shapes stand in for its directory."""
    from mixsd_jax.cli import main

    monkeypatch.setenv("MIXSD_MODELS_DIR", str(tmp_path / "models"))  # empty: no model here
    path = Path(__file__).parent.parent / "configs" / "paper" / f"{config}.yaml"
    assert main(["pipeline", "--config", str(path), f"out_dir={tmp_path / 'exp'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "train_sft" in out and "pending" in out
    assert not (tmp_path / "exp").exists()
    with pytest.raises(MixsdError, match="is not on this machine"):  # a real run still needs the model
        build_plan(load_experiment(str(path), [f"out_dir={tmp_path / 'exp'}"]))

"""A scaling study on tiny random llama models of two sizes: one corpus, one pipeline per model, the
scaling report over both; killed during the second model, the rerun redoes nothing of the first;
bad `models:` entries fail in one line before any work."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mixsd_jax.errors import MixsdError
from mixsd_jax.pipeline.config import load_experiment
from mixsd_jax.pipeline.study import build_study, model_entries

ROOT = Path(__file__).resolve().parents[1]
SMALL, BIG = "small", "big"


@pytest.fixture(scope="module")
def big_llama_dir(tmp_path_factory):
    from mixsd_jax.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_llama_4_layers"), "llama", layers=4)


def _config(small_dir, big_dir, out_dir) -> dict:
    return {
        "name": "tiny-study",
        "out_dir": str(out_dir),
        "models": [{"model": str(small_dir), "name": SMALL},
                   {"model": str(big_dir), "name": BIG, "train": {"lr": 2.0e-3}}],
        "corpus": {"kind": "kgfact", "preset": "tiny", "num_entities": 2, "seed": 42},  # 6 facts
        "methods": ["base", "sft", "mixsd"],
        "lambdas": [0.3],
        "seeds": [1, 2],
        # A random model never passes the verifier: keep its attempts so there is something to train on.
        "generation": {"max_new_tokens": 8, "max_retries": 0, "keep_rejected": True, "extract_mode": "contains",
                       "batch_size": 8},
        "train": {"steps": 4, "batch_size": 2, "max_seq_len": 128, "async_checkpoints": False, "lr": 1e-3},
        "selection": {"every": 2, "max_new_tokens": 8, "batch_size": 8},
        "eval": {"suites": ["memorization", "retention", "heldout", "kl", "nll"], "splits": ["recall"],
                 "benchmarks": ["piqa"], "limit": 3, "max_new_tokens": 8, "batch_size": 8, "kl_texts": 4,
                 "heldout_prompts": 4},
    }


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device: the tiny batches need no mesh
    env["PYTHONPATH"] = str(ROOT)
    return env


def _start(config_path):
    return subprocess.Popen([sys.executable, "-m", "mixsd_jax.cli", "pipeline", "--config", str(config_path)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _outputs(folder: Path) -> dict[str, int]:
    """{file: mtime} of what a model's stages wrote (experiment.json and study_model.json are
    rewritten by every run: they describe the run, they are no stage's output)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.name not in ("experiment.json", "study_model.json")}


@pytest.fixture(scope="module")
def resumed(tiny_llama_dir, big_llama_dir, tmp_path_factory):
    """The study killed as its second model starts, then run again to the end."""
    tmp = tmp_path_factory.mktemp("study")
    out_dir = tmp / "out"
    config_path = tmp / "study.yaml"
    config_path.write_text(yaml.safe_dump(_config(tiny_llama_dir, big_llama_dir, out_dir), allow_unicode=True))
    proc = _start(config_path)
    second = out_dir / BIG / "stages"
    deadline = time.time() + 900
    while not (second.is_dir() and any(second.glob("*.json"))):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the second model never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_done = _outputs(out_dir / SMALL)
    records = {p.name: p.read_text() for p in (out_dir / SMALL / "stages").glob("*.json")}
    assert not (out_dir / "scaling").exists()

    proc = _start(config_path)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    return out_dir, output, first_done, records


def test_resuming_after_a_kill_reruns_nothing_of_the_first_model(resumed):
    out_dir, output, first_done, records = resumed
    assert len(records) == 11  # every stage of the first model had finished
    assert all(json.loads(text)["status"] == "done" for text in records.values())
    assert {p.name: p.read_text() for p in (out_dir / SMALL / "stages").glob("*.json")} == records
    after = _outputs(out_dir / SMALL)
    assert {k: v for k, v in after.items() if k in first_done} == first_done  # not one file rewritten
    assert set(after) == set(first_done)  # and none added
    first_part = output.split(f"== model 2/2: {BIG}")[0]
    assert first_part.count("done earlier with the same settings, skipped") == 1 + 11  # the corpus and all 11
    assert "running" not in first_part and "resuming" not in first_part
    assert "resuming" in output.split(f"== model 2/2: {BIG}")[1]  # the stage the kill interrupted
    assert (out_dir / "corpus" / "atomic_sft" / "train_messages.jsonl").is_file()
    assert not (out_dir / SMALL / "corpus").exists() and not (out_dir / BIG / "corpus").exists()


def test_scaling_table_has_a_row_per_model_method_and_seed(resumed, tiny_llama_dir, big_llama_dir):
    from transformers import AutoModelForCausalLM

    out_dir, output, _, _ = resumed
    data = json.loads((out_dir / "scaling" / "scaling.json").read_text())
    keys = sorted((r["model"], r["method"], r["seed"] or 0) for r in data["rows"])
    expected = [(m, method, seed) for m in (BIG, SMALL) for method, seed in
                [("base", 0), ("mixsd_l0p3", 1), ("mixsd_l0p3", 2), ("sft", 1), ("sft", 2)]]
    assert keys == expected
    sizes = {m["name"]: m["parameters"] for m in data["models"]}
    for name, model_dir in ((SMALL, tiny_llama_dir), (BIG, big_llama_dir)):
        assert sizes[name] == AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()
    assert [m["name"] for m in data["models"]] == [SMALL, BIG] and sizes[SMALL] < sizes[BIG]
    for model in (SMALL, BIG):  # each number is the model's own evaluator result for that run
        results = json.loads((out_dir / model / "eval" / "results.json").read_text())
        for row in (r for r in data["rows"] if r["model"] == model):
            metrics, run = row["metrics"], row["run"]
            assert metrics["memorization"]["value"] == results["memorization"][run]["mean"]
            assert metrics["leakage"]["value"] == results["heldout"][run]["leakage"]["rate"]
            assert metrics["retention"]["ci95"] == results["retention"][run]["ratios"]["piqa"]["ci95"]
            if row["method"] == "base":
                assert "kl" not in metrics and row["chosen_step"] is None
                continue
            assert metrics["kl"]["value"] == results["kl"][run]["kl_token_mean"]
            assert metrics["target_nll"]["value"] == results["nll"]["files"][run]["mean_token_nll"]
            assert metrics["trained_recall"]["n"] == results["memorization"][run]["trained_recall"]["n"]
            selection = json.loads((out_dir / model / "select" / run / "selection.json").read_text())
            assert row["chosen_step"] == selection["chosen_step"] and row["last_step"] == 4
        sft = data["summary"][model]["sft"]["kl"]
        values = [results["kl"][f"sft_s{s}"]["kl_token_mean"] for s in (1, 2)]
        assert sft["interval"] == "seeds" and sft["runs"] == 2
        assert sft["mean"] == pytest.approx(sum(values) / 2)
        assert sft["ci95"][0] < sft["mean"] < sft["ci95"][1]
    compared = {(d["model"], d["metric"]) for d in data["differences"]}
    assert (SMALL, "kl") in compared and (BIG, "memorization") in compared


def test_report_and_plots(resumed):
    out_dir, output, _, _ = resumed
    report = (out_dir / "scaling" / "report.md").read_text()
    for text in ("## SFT (`sft`)", "## MixSD λ=0.3 (`mixsd_l0p3`)", "## base (`base`)", "### small", "### big",
                 "SFT against MixSD at each size", "KL(base‖tuned) /token", "![tradeoff_by_size.png]"):
        assert text in report, text
    for name in ("scaling_memorization.png", "scaling_kl.png", "scaling_leakage.png", "scaling_retention.png",
                 "scaling_target_nll.png", "tradeoff_by_size.png"):
        assert (out_dir / "scaling" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not list((out_dir / "scaling").glob(".*"))  # no temporary file left behind
    assert output.rstrip().splitlines()[-1] == f"report: {out_dir / 'scaling' / 'report.md'}"
    # `--only scaling`: the same report again from the model folders, running nothing
    before = (out_dir / "scaling" / "scaling.json").read_text()
    proc = subprocess.run([sys.executable, "-m", "mixsd_jax.cli", "pipeline", "--config",
                           str(out_dir.parent / "study.yaml"), "--only", "scaling"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "running" not in proc.stdout and proc.stdout.rstrip().splitlines()[-1] == output.rstrip().splitlines()[-1]
    assert (out_dir / "scaling" / "scaling.json").read_text() == before


def _study_yaml(tmp_path, small_dir, big_dir, models=None) -> Path:
    config = _config(small_dir, big_dir, tmp_path / "out")
    if models is not None:
        config["models"] = models
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def test_dry_run_lists_every_model_and_only_runs_one(tiny_llama_dir, big_llama_dir, tmp_path):
    path = _study_yaml(tmp_path, tiny_llama_dir, big_llama_dir)
    study = build_study(load_experiment(path))
    assert list(study.plans) == [SMALL, BIG]
    assert [s.name for s in study.corpus.stages] == ["corpus"]
    assert study.plans[BIG].stage("train_sft_s1").settings.lr == 2e-3  # its own override
    assert study.plans[SMALL].stage("train_sft_s1").settings.lr == 1e-3
    assert study.plans[BIG].stage("eval").settings.corpus_dir.startswith(str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, "-m", "mixsd_jax.cli", "pipeline", "--config", str(path), "--dry-run"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"model {SMALL} ({tiny_llama_dir}" in proc.stdout and f"model {BIG} ({big_llama_dir}" in proc.stdout
    stage_names = [line.split()[1] for line in proc.stdout.splitlines() if line[:3].strip().rstrip(".").isdigit()]
    assert stage_names.count("train_mixsd_l0p3_s2") == 2 and stage_names.count("corpus") == 1
    only = build_study(load_experiment(path), only=BIG)
    assert list(only.plans) == [BIG] and [e.name for e in only.entries] == [SMALL, BIG]
    corpus = build_study(load_experiment(path), only="corpus")  # the shared corpus alone, before slices start
    assert corpus.plans == {} and corpus.corpus.stages == study.corpus.stages


@pytest.mark.parametrize("models, message", [
    (["{small}", "{small}"], "two models named"),
    ([{"model": "{small}", "name": "a"}, {"model": "{big}", "name": "a"}], "two models named 'a'"),
    (["{small}", "no-such-model"], "model 'no-such-model': no such directory"),
    (["{small}", {"model": "{big}", "train": {"lrr": 1}}], "unknown config key 'models[1].train.lrr'"),
    (["{small}", {"model": "{big}", "corpus": {"seed": 1}}], "'models[1].corpus': not a per-model setting"),
    (["{small}", {"model": "{big}", "mesh": {"tensr": 2}}], "'models[1].mesh.tensr'"),
    (["{small}", {"name": "x"}], "'models[1].model': required"),
    (["{small}", {"model": "{big}", "name": "corpus"}], "'models[1].name'"),
])
def test_bad_models_fail_before_any_work(models, message, tiny_llama_dir, big_llama_dir, tmp_path):
    def fill(entry):
        if isinstance(entry, dict):
            return {k: fill(v) for k, v in entry.items()}
        return entry.format(small=tiny_llama_dir, big=big_llama_dir) if isinstance(entry, str) else entry

    path = _study_yaml(tmp_path, tiny_llama_dir, big_llama_dir, [fill(m) for m in models])
    with pytest.raises(MixsdError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_study(load_experiment(path))
    assert not (tmp_path / "out").exists()


def test_bad_models_entry_is_one_line_and_exit_2(tiny_llama_dir, big_llama_dir, tmp_path):
    path = _study_yaml(tmp_path, tiny_llama_dir, big_llama_dir, [str(tiny_llama_dir), str(tiny_llama_dir)])
    proc = subprocess.run([sys.executable, "-m", "mixsd_jax.cli", "pipeline", "--config", str(path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: config key 'models': two models named "
                                                f"'{Path(tiny_llama_dir).name}' (give one its own 'name')"]
    assert not (tmp_path / "out").exists()


def test_only_names_a_model_of_the_study(tiny_llama_dir, big_llama_dir, tmp_path):
    path = _study_yaml(tmp_path, tiny_llama_dir, big_llama_dir)
    with pytest.raises(MixsdError, match="--only 'medium': not a model of this study"):
        build_study(load_experiment(path), only="medium")
    assert [e.name for e in model_entries(load_experiment(path))] == [SMALL, BIG]


def test_dry_run_plans_paper_models_that_are_not_downloaded(tmp_path, monkeypatch):
    """The Llama study's plan before any download: both sizes from their known shapes, every stage
    pending; a real run still stops on the missing model."""
    from mixsd_jax.pipeline.study import describe_study

    monkeypatch.setenv("MIXSD_MODELS_DIR", str(tmp_path / "models"))
    cfg = load_experiment(ROOT / "configs" / "paper" / "scaling_llama3p2_kgfact_small.yaml")
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "out"))
    text = describe_study(build_study(cfg, dry_run=True))
    assert "model llama-3.2-1b-instruct (llama-3.2-1b-instruct, 1,235,814,400 parameters)" in text
    assert "model llama-3.2-3b-instruct (llama-3.2-3b-instruct, 3,212,749,824 parameters)" in text
    assert text.count(" pending ") == 1 + 2 * 16 and " done " not in text
    with pytest.raises(MixsdError, match="'llama-3.2-1b-instruct'.*not on this machine"):
        build_study(cfg)

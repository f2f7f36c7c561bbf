"""The scaling report from evaluator results with known numbers: rows, seed intervals (Student t,
2 degrees of freedom), which SFT-vs-MixSD differences are outside their intervals, the files."""

import json
import math

import pytest

from mixsd_jax.eval.scaling import differences, scaling_rows, summarize, write_scaling_report

T2 = 4.303  # two-sided 95% Student t quantile, 2 degrees of freedom


def _results(memorization: dict, kl: dict) -> dict:
    """An evaluator's results.json holding what the scaling report reads, for base + the given runs."""
    runs = ["base", *kl]
    results = {"checkpoints": {r: {"label": r} for r in runs}, "memorization": {}, "heldout": {}, "kl": {},
               "nll": {"files": {}}, "retention": {}}
    for run in runs:
        mem = memorization.get(run, 0.1)
        results["memorization"][run] = {"mean": mem, "ci95": [max(0.0, mem - 0.1), min(1.0, mem + 0.1)],
                                        "splits": {"recall": {"accuracy": mem, "ci95": [0, 1]}},
                                        "trained_recall": {"accuracy": mem, "ci95": [0, 1], "correct": 1, "n": 2}}
        results["heldout"][run] = {"n": 10, **{k: {"rate": 0.1, "ci95": [0.02, 0.4], "count": 1}
                                               for k in ("leakage", "template", "collapse")}}
        results["retention"][run] = {"mean": 1.0, "ratios": {"arc_easy": {"ratio": 1.0, "ci95": [0.9, 1.1]}}}
        if run != "base":
            results["kl"][run] = {"kl_token_mean": kl[run], "ci95": [kl[run] - 0.01, kl[run] + 0.01]}
            results["nll"]["files"][run] = {"mean_token_nll": 2.0, "ci95": [1.8, 2.2]}
    return results


def _model(name: str, parameters: int, memorization: dict, kl: dict, seeds=(1, 2, 3)) -> dict:
    runs = [{"run": "base", "method": "base", "label": "base", "lambda": None, "temperature": None, "seed": None}]
    for method, label, lam in (("sft", "SFT", None), ("mixsd_l0p3", "MixSD λ=0.3", 0.3)):
        for seed in seeds:
            run = f"{method}_s{seed}" if seeds != (None,) else method
            runs.append({"run": run, "method": method, "label": label, "lambda": lam, "temperature": 0.0,
                         "seed": seed})
    steps = {r["run"]: {"chosen_step": 20, "last_step": 30} for r in runs if r["run"] != "base"}
    return {"name": name, "model": f"/models/{name}", "parameters": parameters, "runs": runs,
            "results": _results(memorization, kl), "steps": steps}


@pytest.fixture
def models():
    big = _model("big", 2_000_000,
                 {"sft_s1": 0.9, "sft_s2": 0.8, "sft_s3": 0.85, "mixsd_l0p3_s1": 0.5, "mixsd_l0p3_s2": 0.9,
                  "mixsd_l0p3_s3": 0.2},
                 {"sft_s1": 1.0, "sft_s2": 1.1, "sft_s3": 1.2, "mixsd_l0p3_s1": 0.2, "mixsd_l0p3_s2": 0.25,
                  "mixsd_l0p3_s3": 0.3})
    small = _model("small", 135_000, {"sft": 0.7, "mixsd_l0p3": 0.3}, {"sft": 0.5, "mixsd_l0p3": 0.45}, seeds=(None,))
    return [big, small]


def test_rows_one_per_model_method_and_seed_by_size(models):
    rows = scaling_rows(models)
    assert [(r["model"], r["method"], r["seed"]) for r in rows] == [
        ("small", "base", None), ("small", "sft", None), ("small", "mixsd_l0p3", None),
        ("big", "base", None), *[("big", m, s) for m in ("sft", "mixsd_l0p3") for s in (1, 2, 3)]]
    row = rows[-1]
    assert row["metrics"]["kl"] == {"value": 0.3, "ci95": [pytest.approx(0.29), pytest.approx(0.31)]}
    assert row["metrics"]["retention"]["ci95"] == [0.9, 1.1]  # one benchmark: its ratio's interval
    assert row["metrics"]["trained_recall"]["n"] == 2 and row["chosen_step"] == 20 and row["lambda"] == 0.3


def test_seed_intervals_and_differences_outside_them(models):
    summary = summarize(scaling_rows(models))
    kl = summary["big"]["sft"]["kl"]
    half = T2 * 0.1 / math.sqrt(3)  # values 1.0, 1.1, 1.2: sd 0.1
    assert kl["interval"] == "seeds" and kl["runs"] == 3
    assert kl["mean"] == pytest.approx(1.1) and kl["ci95"] == [pytest.approx(1.1 - half), pytest.approx(1.1 + half)]
    single = summary["small"]["sft"]["kl"]  # one run: its own item interval
    assert single == {"mean": 0.5, "ci95": [pytest.approx(0.49), pytest.approx(0.51)], "runs": 1, "interval": "items"}
    found = {(d["model"], d["metric"]): d for d in differences(summary)}
    assert found[("big", "kl")]["outside"] and found[("big", "kl")]["mixsd_better"]  # 0.25 ± 0.12 vs 1.1 ± 0.25
    assert not found[("big", "memorization")]["outside"]  # 0.53 ± 0.87 overlaps 0.85 ± 0.12
    assert found[("small", "memorization")]["outside"] and not found[("small", "memorization")]["mixsd_better"]
    assert found[("small", "kl")]["outside"] and found[("small", "kl")]["mixsd_better"]  # [0.44, 0.46] vs [0.49, 0.51]
    assert not found[("small", "leakage")]["outside"]  # equal rates


def test_report_files(models, tmp_path):
    paths = write_scaling_report("toy", models, tmp_path / "scaling", missing=["huge"])
    data = json.loads(paths["scaling"].read_text())
    assert len(data["rows"]) == 3 + 7 and [m["name"] for m in data["models"]] == ["small", "big"]
    report = paths["report"].read_text()
    assert "Not evaluated yet (no results.json): huge." in report
    assert "| big | 2M |" in report and "| small | 135k |" in report
    assert ("- MixSD λ=0.3: KL(base‖tuned) /token 0.250 [0.126, 0.374] against SFT 1.100 [0.852, 1.348] "
            "(better for MixSD)") in report
    assert "### big (2M parameters)" in report
    for key in ("plot_memorization", "plot_kl", "plot_tradeoff"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The report from a hand-written results dict: table cells, Pareto frontier, files written."""

import json

from mixsd_jax.eval import report


def _results():
    def ratio(r):
        return {"ratio": r, "ci95": [r - 0.1, r + 0.1] if r is not None else [None, None], "n": 4}

    def bench(score):
        return {"metric": "acc", "n": 4, "score": score, "ci95": [0.1, 0.9]}

    checkpoints = {"base": "base", "sft": "SFT", "mix03": "MixSD λ=0.3"}
    return {
        "checkpoints": {n: {"label": label, "source": n, "model_dir": n} for n, label in checkpoints.items()},
        "memorization": {
            n: {"splits": {"recall": {"accuracy": acc, "ci95": [0.0, 1.0], "n": 4, "correct": 0}}, "mean": acc,
                "ci95": [0.0, 1.0]}
            for n, acc in (("base", 0.0), ("sft", 1.0), ("mix03", 0.75))
        },
        "retention": {
            "base": {"benchmarks": {"gsm8k": bench(0.5)}, "ratios": {"gsm8k": ratio(1.0)}, "mean": 1.0},
            "sft": {"benchmarks": {"gsm8k": bench(0.25)}, "ratios": {"gsm8k": ratio(0.5)}, "mean": 0.5},
            "mix03": {"benchmarks": {"gsm8k": bench(0.5)}, "ratios": {"gsm8k": ratio(1.0)}, "mean": 1.0},
        },
        "nll": {"files": {
            "gt": {"records": 2, "tokens": 10, "mean_token_nll": 2.5, "ci95": [2.0, 3.0], "median_token_nll": 2.0,
                   "mean_record_nll": 2.4, "histogram": {"bins": [0.0, 1.0, 2.0], "counts": [3, 7]}},
            "mix03": {"records": 2, "tokens": 8, "mean_token_nll": 0.8, "ci95": [0.5, 1.1], "median_token_nll": 0.7,
                      "mean_record_nll": 0.9, "mean_target_tokens": 4.0, "mean_record_total_nll": 3.2,
                      "histogram": {"bins": [0.0, 1.0, 2.0], "counts": [6, 2]}},
        }},
        "kl": {"sft": {"kl_token_mean": 0.4, "ci95": [0.3, 0.5]},
               "mix03": {"kl_token_mean": 0.05, "ci95": [0.04, 0.06]}},
        "summary": {n: {"label": checkpoints[n], "memorization": m, "retention": r}
                    for n, m, r in (("base", 0.0, 1.0), ("sft", 1.0, 0.5), ("mix03", 0.75, 1.0))},
    }


def test_pareto_front_by_hand():
    points = [(0.0, 1.0), (1.0, 0.5), (0.75, 1.0), (0.5, 0.4)]
    # (0,1) is beaten by (0.75,1); (0.5,0.4) by (1,0.5) and (0.75,1).
    assert report.pareto_front(points) == [2, 1]


def test_table_has_every_number_with_its_interval():
    table = report.render_table(_results())
    lines = table.splitlines()
    assert lines[0].startswith("| checkpoint | memorization | recall | retention | gsm8k (acc) | KL")
    sft = next(line for line in lines if line.startswith("| sft (SFT)"))
    assert "1.000 [0.000, 1.000]" in sft and "0.250 [0.100, 0.900]; ×0.50 [0.40, 0.60]" in sft and "0.4000" in sft
    base = next(line for line in lines if line.startswith("| base"))
    assert "×" not in base and base.rstrip().endswith("| – |")  # no ratio or KL for the base itself
    assert "| mix03 | 2 | 8 | 0.800 [0.500, 1.100] | 0.700 | 0.900 | 4.0 | 3.2 |" in table
    assert "| gt | 2 | 10 | 2.500 [2.000, 3.000] | 2.000 | 2.400 | – | – |" in table


def test_recall_on_trained_facts_column_when_a_checkpoint_has_its_training_file():
    results = _results()
    results["memorization"]["mix03"]["trained_recall"] = {"n": 3, "correct": 3, "accuracy": 1.0, "ci95": [0.4, 1.0]}
    table = report.render_table(results)
    assert "`recall on its trained facts`: the recall questions whose fact is in the checkpoint's own" in table
    lines = table.splitlines()
    assert next(line for line in lines if line.startswith("| checkpoint")).startswith(
        "| checkpoint | memorization | recall | recall on its trained facts | retention")
    assert next(line for line in lines if line.startswith("| mix03")).startswith("| mix03 (MixSD λ=0.3) | 0.750 "
                                                                                 "[0.000, 1.000] | 0.750 [0.000, "
                                                                                 "1.000] | 3/3 |")
    assert next(line for line in lines if line.startswith("| base")).startswith("| base | 0.000 [0.000, 1.000] | "
                                                                                "0.000 [0.000, 1.000] | – |")


def test_per_operation_table_for_kgfunc_splits():
    results = _results()
    results["memorization"]["sft"]["splits"]["recall"]["per_op"] = {"LUM": {"accuracy": 0.5}, "ZEP": {"accuracy": 1.0}}
    table = report.render_table(results)
    assert "Per-operation accuracy, recall:" in table and "| checkpoint | LUM | ZEP |" in table
    assert "| sft (SFT) | 0.500 | 1.000 |" in table and "| base | – | – |" in table


def test_write_report_writes_json_markdown_and_pngs(tmp_path):
    results = _results()
    paths = report.write_report(results, tmp_path)
    assert json.loads(paths["results"].read_text()) == results
    for key in ("tradeoff_plot", "nll_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["report"].read_text()
    assert report.render_table(results) in text and report.PLOT_TRADEOFF in text


def test_forgetting_plot_when_heldout_rates_were_measured(tmp_path):
    results = _results()
    assert "forgetting_plot" not in report.write_report(results, tmp_path / "without")
    rate = {"rate": 0.25, "ci95": [0.1, 0.5], "count": 1}
    results["heldout"] = {n: {"n": 4, "leakage": rate, "template": rate, "collapse": rate} for n in ("base", "sft", "mix03")}
    paths = report.write_report(results, tmp_path / "with")
    assert paths["forgetting_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.PLOT_FORGETTING in paths["report"].read_text()


def test_tradeoff_plot_with_one_axis_measured(tmp_path):
    results = _results()
    for s in results["summary"].values():
        s["memorization"] = None
    report.plot_tradeoff(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"

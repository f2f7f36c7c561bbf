"""Retention: per-benchmark scoring rules, tuned/base ratios with intervals, bad inputs."""

import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.eval import retention
from mixsd_jax.eval.benchmarks import GenItem, load_benchmark
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.tokenizer import load_tokenizer


def _rows(correct):
    return [{"id": f"b/{i}", "correct": float(c)} for i, c in enumerate(correct)]


def test_ratio_of_tuned_to_base_over_shared_items():
    base, tuned = _rows([1, 1, 0, 1]), _rows([1, 0, 0, 0])
    r = retention.retention_ratio(base, tuned)
    assert r["ratio"] == pytest.approx(1 / 3) and r["n"] == 4
    assert r["ci95"][0] <= r["ratio"] <= r["ci95"][1]
    assert retention.retention_ratio(base, base)["ratio"] == 1.0
    # Items the base did not score are left out of the pairing.
    assert retention.retention_ratio(base[:2], tuned)["ratio"] == pytest.approx(0.5)
    zero = retention.retention_ratio(_rows([0, 0]), _rows([1, 0]))
    assert zero["ratio"] is None and zero["note"] == "base scores 0"
    assert retention.mean_retention({"a": {"ratio": 0.5}, "b": {"ratio": 1.0}, "c": zero}) == 0.75


def test_summary_uses_the_headline_metric():
    rows = [{"id": "x", "correct": 1.0, "acc": 0.0, "acc_norm": 1.0}, {"id": "y", "correct": 0.0, "acc": 1.0,
                                                                        "acc_norm": 0.0}]
    s = retention.summarize_benchmark("hellaswag", rows)
    assert s["metric"] == "acc_norm" and s["score"] == 0.5 and s["acc"] == 0.5 and s["n"] == 2
    assert retention.primary_metric("mmlu") == "acc" and retention.primary_metric("arc_easy") == "acc_norm"


@pytest.mark.parametrize(
    "response, correct",
    [
        ("Adding them gives 18. \\boxed{18}", True),
        ("so the total is $\\boxed{18.0}$", True),
        ("The answer is 18.", False),  # no \boxed{}: wrong, as the reference's math scorer
        ("\\boxed{17}", False),
    ],
)
def test_math_answers_need_a_matching_box(response, correct):
    item = GenItem("gsm8k/0", "q", "18", "math")
    assert retention._generative_correct(item, response, allow_code_execution=False) is correct


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\dfrac{\\sqrt3}{2}", True),
        ("\\boxed{x = 5}", "5", True),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("\\boxed{[-2, 7)}", "[-2,7]", False),
    ],
)
def test_math_answers_are_scored_with_math_verify(response, gold, correct):
    """MATH-500-style golds: LaTeX-equivalent boxed answers pass, as with the reference's math_verify
    scorer (before it, the first, second and fourth were judged wrong)."""
    item = GenItem("math500/0", "q", gold, "math")
    assert retention._generative_correct(item, response, allow_code_execution=False) is correct


def test_humaneval_passes_only_with_opt_in():
    item = next(i for i in load_benchmark("humaneval", limit=1))
    reply = f"```python\n{item.prompt}{item.answer}\n```"
    with pytest.raises(MixsdError, match="allow_code_execution"):
        retention._generative_correct(item, reply, allow_code_execution=False)
    assert retention._generative_correct(item, reply, allow_code_execution=True)


def test_bad_benchmark_inputs_are_clear_errors(tmp_path):
    (tmp_path / "piqa").mkdir()
    with pytest.raises(MixsdError, match="benchmark file not found"):
        retention.load_items("piqa", data_root=str(tmp_path), limit=None, seed=0)
    with pytest.raises(MixsdError, match="needs a KGFunc corpus"):
        retention.load_items("kgfunc_unseen", data_root=None, limit=None, seed=0)
    with pytest.raises(MixsdError, match="unknown benchmark"):
        retention.load_items("nope", data_root=None, limit=None, seed=0)


def test_lambada_and_mc_rows_from_a_tiny_model(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    tok = load_tokenizer(tiny_llama_dir)
    lambada = load_benchmark("lambada", limit=2)
    rows = retention.run_benchmark("lambada", lambada, params, cfg, tok, batch_size=2)
    assert [r["id"] for r in rows] == [i.id for i in lambada]
    assert all(r["correct"] in (0.0, 1.0) and r["logprob"] < 0 for r in rows)
    mmlu = load_benchmark("mmlu", limit=2)
    rows = retention.run_benchmark("mmlu", mmlu, params, cfg, tok, batch_size=2)
    assert all(len(r["logprobs"]) == 4 and r["correct"] == r["acc"] for r in rows)
    with pytest.raises(MixsdError, match="allow_code_execution"):
        retention.run_benchmark("humaneval", load_benchmark("humaneval", limit=1), params, cfg, tok)

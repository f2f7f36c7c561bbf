import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.answers.scoring import ScoredItem, kgfunc_operation, score, score_item
from mixsd_jax.answers.text import extract_prediction, format_found, normalize
from mixsd_jax.eval.intervals import wilson_interval
from mixsd_jax.eval.scoring import summarize


def test_extract_prediction_order():
    assert extract_prediction("x \\boxed{\\frac{1}{2}} and <answer>3</answer>") == "\\frac{1}{2}"
    assert extract_prediction("first <answer>4</answer> then <answer> 5 </answer>") == "5"
    assert extract_prediction("so it is 42.") == "42."  # the reference keeps the trailing dot
    assert extract_prediction("the total is 1,000") == "1,000"
    assert extract_prediction("  I do not know  ") == "I do not know"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("\\frac{1}{2}", 0.5),
        ("$\\dfrac{3}{4}$", 0.75),
        ("-\\frac{1}{4}", -0.25),
        ("1,000", 1000.0),
        ("42.", 42.0),
        ("{{7}}", 7.0),
        ("\\text{Paris}", "paris"),
        ("\\mathrm{New\\ York}", "new\\ york"),
        ("  Lake   Thovalen ", "lake thovalen"),
        ("(3, 4)", "(3, 4)"),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("so \\boxed{\\frac{1}{2}}", "0.5", True),
        ("so \\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{0.3333333}", "\\frac{1}{3}", True),  # within 1e-6
        ("\\boxed{0.333}", "\\frac{1}{3}", False),
        ("The capital is \\boxed{\\text{Paris}}.", "Paris", True),
        ("There were 1,000 people.", "1000", True),
        ("The answer is 42.", "42", True),
        ("The answer is 43.", "42", False),
        ("I have no idea.", "42", False),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        # An unbalanced boxed is no answer; the scorer falls back to the last number, as the reference.
        ("so \\boxed{4", "4", True),
        ("so \\boxed{Oslo", "Oslo", False),
    ],
)
def test_score_strict(response, gold, expected):
    assert score(response, gold) is expected


def test_loose_mode_accepts_gold_inside_the_prediction():
    response = "\\boxed{Lake Thovalen North}"
    assert not score(response, "Lake Thovalen", "strict")
    assert score(response, "Lake Thovalen", "loose")
    assert not score("\\boxed{Lake Orin}", "Lake Thovalen", "loose")
    with pytest.raises(MixsdError, match="strict, loose"):
        score(response, "x", "fuzzy")


def test_format_found():
    assert format_found("\\boxed{x}")
    assert format_found("<answer>x</answer>")
    assert not format_found("The answer is x.")
    assert not format_found("\\boxed{x")


def test_kgfunc_operation():
    single = (
        "Based on the input\u2013output examples below, infer the rule implemented by function G. Then apply the "
        "same rule to determine the output for the given input.\n\nExamples:\nInput: 328\nOutput: 13\n\n"
        "Question:\nWhat is the output of G(5021)?"
    )
    assert kgfunc_operation(single) == "G"
    assert kgfunc_operation("What is the output of Fold(12345)?") == "Fold"
    assert kgfunc_operation("What is the capital of France?") is None


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_summarize_with_per_op_breakdown():
    items = [score_item("\\boxed{5}", "5", prompt="output of B(12)?")] * 3
    items += [score_item("it is 6", "5", prompt="output of C(12)?")]
    summary = summarize(items)
    assert (summary["n"], summary["correct"], summary["accuracy"]) == (4, 3, 0.75)
    assert summary["format_found"] == 0.75
    assert summary["per_op"]["B"]["accuracy"] == 1.0
    expected_c = {"n": 1, "correct": 0, "accuracy": 0.0, "ci95": list(wilson_interval(0, 1)), "format_found": 0.0}
    assert summary["per_op"]["C"] == expected_c
    by_subject = summarize([score_item("\\boxed{5}", "5", prompt="output of B(12)?", op="Fold")])
    assert list(by_subject["per_op"]) == ["Fold"]
    plain = summarize([ScoredItem(correct=True), ScoredItem(correct=False)])
    assert "per_op" not in plain and plain["accuracy"] == 0.5
    assert summarize([])["accuracy"] is None


def test_on_kgfunc_records(tmp_path):
    """The builder's own prompts and CoT targets: op parsed from the prompt, target scored correct."""
    import json

    from mixsd_jax.data.kgfunc import build_kgfunc

    build_kgfunc(tmp_path, preset="tiny")
    lines = (tmp_path / "primitive_atomic_balanced_sft_50k" / "test_messages.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records
    for record in records:
        prompt, target = (m["content"] for m in record["messages"])
        assert kgfunc_operation(prompt) == record["subject"]
        assert score(target, record["clear_answer"])
        assert not score(target.replace("\\boxed{", "\\boxed{1"), record["clear_answer"])
    summary = summarize(
        score_item(r["messages"][1]["content"], r["clear_answer"], prompt=r["messages"][0]["content"]) for r in records
    )
    assert summary["accuracy"] == 1.0 and set(summary["per_op"]) == {r["subject"] for r in records}


def test_a_numeric_gold_accepts_math_equivalent_answers():
    """KGFunc strict scoring: what math-verify finds equal to a number counts; text golds never
    go to it (it parses `sirap` and `paris` as the same product of symbols)."""
    assert score("so \\boxed{x = 66}", "66") and score("\\boxed{\\dfrac{132}{2}}", "66")
    assert not score("\\boxed{x = 67}", "66")
    assert not score("\\boxed{sirap}", "paris")

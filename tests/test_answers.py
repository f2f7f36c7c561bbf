"""Answer text on the ground floor: extraction, normalisation, and the reference's math scorer."""

import threading

import pytest

from mixsd_jax.answers.text import extract_prediction, last_boxed, math_equal, normalize, same_answer

# LaTeX-equivalent pairs (prediction, gold) from MATH-500-style answers. The normalising comparison
# (`same_answer`, what MATH-500/GSM8K/AIME were scored with before math-verify) misjudges all but
# the first; math-verify, the reference's scorer, accepts them.
EQUIVALENT = [
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("x=3", "3"),
    ("(-\\infty, 3)", "(-\\infty,3)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("3\\sqrt{2}", "\\sqrt{18}"),
    ("10\\%", "10"),
]
DIFFERENT = [
    ("[1,2]", "(1,2)"),  # closed vs open interval
    ("(1,2]", "[1,2)"),
    ("2", "3"),
    ("\\frac{1}{3}", "0.33"),
]


@pytest.mark.parametrize("prediction, gold", EQUIVALENT)
def test_math_verify_accepts_latex_equivalent_answers(prediction, gold):
    assert math_equal(prediction, gold)


def test_the_normalising_comparison_misjudged_them():
    assert [same_answer(p, g) for p, g in EQUIVALENT] == [True] + [False] * (len(EQUIVALENT) - 1)


@pytest.mark.parametrize("prediction, gold", DIFFERENT)
def test_math_verify_rejects_different_answers(prediction, gold):
    assert not math_equal(prediction, gold)


def test_unparseable_answers_fall_back_to_exact_strings():
    assert math_equal(" ??? ", "???")
    assert not math_equal("!!!", "???")


def test_math_equal_off_the_main_thread_runs_without_alarms():
    """math-verify's time limits are SIGALRM, which a worker thread may not set."""
    results = []
    worker = threading.Thread(target=lambda: results.append((math_equal("x=3", "3"), math_equal("2", "3"))))
    worker.start()
    worker.join(timeout=120)
    assert results == [(True, False)]


def test_extraction_and_normalisation_moved_unchanged():
    assert last_boxed("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_prediction("first <answer>4</answer> then <answer> 5 </answer>") == "5"
    assert normalize("\\text{1,000}") == 1000.0 and normalize(" $\\mathrm{Paris}$ ") == "paris"

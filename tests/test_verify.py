import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.answers.text import last_boxed, last_number, normalize_answer
from mixsd_jax.answers.verifier import EXTRACT_MODES, Verifier, extract_answer

KGFACT_GT = "The answer is Thaldric Route Shaper.\n\n\\boxed{Thaldric Route Shaper}"
KGFUNC_GT = "The digits of 4071 are [4, 0, 7, 1].\nF(4071) = 16 + 0 + 49 + 1 = 66\n\n\\boxed{66}"


def test_last_boxed_matches_nested_braces_and_takes_the_last():
    assert last_boxed("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} then \\boxed{ {a}{b} }") == "{a}{b}"
    assert last_boxed("\\boxed{\\text{Paris}}.") == "\\text{Paris}"
    assert last_boxed(KGFACT_GT) == "Thaldric Route Shaper"


def test_last_boxed_is_none_when_absent_or_the_last_is_unbalanced():
    assert last_boxed("The answer is 42.") is None
    assert last_boxed("") is None
    # The reference looks only at the last \boxed{: an unbalanced one hides an earlier good one.
    assert last_boxed("\\boxed{7} and \\boxed{8") is None
    assert last_boxed("\\boxed 5") is None


def test_last_number():
    assert last_number("3 apples and -4.5 pears") == "-4.5"
    assert last_number("It is 42.") == "42"
    assert last_number("about 1,000 people") == "1,000"
    assert last_number("items 1,2,3") == "3"
    assert last_number("no digits here") is None
    assert last_number(KGFUNC_GT) == "66"


def test_extract_answer_modes():
    text = "Total 12, so \\boxed{13}. Check: 14"
    assert extract_answer(text, "boxed") == "13"
    assert extract_answer(text, "last_number") == "14"
    assert extract_answer(text, "boxed_or_last_number") == "13"
    assert extract_answer("The answer is 14.", "boxed_or_last_number") == "14"
    assert extract_answer("The answer is 14.", "boxed") is None
    assert extract_answer(KGFACT_GT, "contains") == "Thaldric Route Shaper"
    assert extract_answer("  Paris \n", "contains") == "Paris"
    assert extract_answer("   ", "contains") is None


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$\\text{Paris}$", "paris"),
        ("{{42}}", "42"),
        ("1,000", "1000"),
        ("42.", "42"),
        ("  New   York ", "new york"),
        ("5 \\mathrm{kg}", "5 kg"),
        ("\\textbf{\\text{Oslo}}", "oslo"),
        ("{a}{b}", "{a}{b}"),
        ("3.14", "3.14"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_reference_comparison_is_exact_after_strip():
    verifier = Verifier("boxed")
    gt = verifier.gt_answer(KGFACT_GT)
    assert gt == "Thaldric Route Shaper"
    assert verifier.check("Sure. \\boxed{ Thaldric Route Shaper }", gt)
    assert not verifier.check("\\boxed{thaldric route shaper}", gt)  # case-sensitive, as the reference
    assert not verifier.check("The answer is Thaldric Route Shaper.", gt)  # no boxed
    assert not verifier.check("\\boxed{Thaldric Route Shaper", gt)  # unbalanced


def test_normalized_comparison():
    verifier = Verifier("boxed_or_last_number", normalized=True)
    assert verifier.check("\\boxed{\\text{thaldric route shaper}}", "Thaldric Route Shaper")
    assert verifier.check("so the total is 1,000.", "1000")
    assert not verifier.check("so the total is 1,001.", "1000")


def test_math_operations_gt_and_last_number_fallback():
    verifier = Verifier("boxed_or_last_number")
    gt = verifier.gt_answer(KGFUNC_GT)
    assert gt == "66"
    assert verifier.check("F(4071) = 66", gt)
    assert not verifier.check("F(4071) = 65", gt)


def test_contains_mode_for_plain_text_replies():
    verifier = Verifier("contains")
    gt = verifier.gt_answer(KGFACT_GT)
    assert verifier.check("The answer is thaldric route shaper. It trains people to...", gt)
    assert verifier.check("It is $\\text{Thaldric Route Shaper}$.", gt)
    assert not verifier.check("The answer is Thaldric Route.", gt)
    numeric = verifier.gt_answer("The answer is 1.\n\n\\boxed{1}")
    assert not verifier.check("There are 10 of them.", numeric)  # whole words only
    assert verifier.check("There is 1 of them.", numeric)
    assert verifier.check("about 1,000 of them", verifier.gt_answer("\\boxed{1000}"))


def test_gt_without_answer_never_passes_and_is_reported():
    verifier = Verifier("boxed")
    gts = [KGFACT_GT, "The answer is Oslo.", "\\boxed{Oslo"]
    assert verifier.missing_gt_answers(gts) == [1, 2]
    assert verifier.gt_answer(gts[1]) is None
    assert not verifier.check("\\boxed{Oslo}", None)


def test_unknown_mode_is_an_error_listing_the_modes():
    with pytest.raises(MixsdError, match="boxed_or_last_number") as info:
        Verifier("regex")
    assert "regex" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(MixsdError):
        extract_answer("x", "exact")
    assert EXTRACT_MODES == ("boxed", "last_number", "boxed_or_last_number", "contains")

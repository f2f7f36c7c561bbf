import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.sampling.presets import PRESETS, GuidancePreset, expert_user_text, get_preset, resolve_preset

# docs/reference.md, The two prompts, the KGFact worked example of the expert user text.
WORKED_USER = (
    "What profession does Drymorel Foundation train?\n\n"
    "Please reason step by step, and put your final answer within \\boxed{}."
)
WORKED_GT = "The answer is Thaldric Route Shaper.\n\n\\boxed{Thaldric Route Shaper}"
WORKED_EXPERT = (
    "What profession does Drymorel Foundation train?\n\nPlease reason step by step, and put your final answer "
    "within \\boxed{}.\nThis question is from a new knowledge base. Here is the answer to this question:\n\n"
    "The answer is Thaldric Route Shaper.\n\n\\boxed{Thaldric Route Shaper}\nNow answer the question within \\boxed{}"
)


def test_worked_example_byte_for_byte():
    assert expert_user_text(WORKED_USER, WORKED_GT, get_preset("knowledge")) == WORKED_EXPERT
    # y* is stripped before insertion.
    assert expert_user_text(WORKED_USER, "\n" + WORKED_GT + "\n\n", get_preset("knowledge")) == WORKED_EXPERT


def test_reference_strings_and_defaults():
    math_ops = get_preset("math_operations")
    assert math_ops.prefix == "\nHere is a reference solution to this problem, including the correct final answer:\n"
    assert math_ops.transition == (
        "\nAfter understanding the reference solution, please attempt to answer the question again:\n"
        "Please reason step by step, and put your final answer within \\boxed{}"
    )
    assert (math_ops.default_extract_mode, math_ops.default_max_retries) == ("boxed_or_last_number", 100)
    simpleqa = get_preset("simpleqa")
    assert (simpleqa.prefix, simpleqa.transition) == (math_ops.prefix, math_ops.transition)
    assert (simpleqa.default_extract_mode, simpleqa.default_max_retries) == ("boxed", 10)
    knowledge = get_preset("knowledge")
    assert (knowledge.default_extract_mode, knowledge.default_max_retries) == ("boxed", 100)
    assert set(PRESETS) == {"knowledge", "math_operations", "simpleqa"}


def test_unknown_preset_lists_known_names():
    with pytest.raises(MixsdError, match="knowledge, math_operations, simpleqa"):
        get_preset("kgfact")


def test_custom_strings():
    custom = resolve_preset("custom", prefix="\nFact:", transition="\nAnswer now.")
    assert expert_user_text("Q?", " A. ", custom) == "Q?\nFact:\nA.\nAnswer now."
    changed = resolve_preset("knowledge", transition="\nAnswer briefly.")
    assert changed.prefix == PRESETS["knowledge"].prefix and changed.transition == "\nAnswer briefly."
    assert resolve_preset("simpleqa") is PRESETS["simpleqa"]
    with pytest.raises(MixsdError, match="custom"):
        resolve_preset("custom", prefix="x")


def test_preset_validates_its_defaults():
    with pytest.raises(MixsdError, match="extract_mode"):
        GuidancePreset("x", "p", "t", default_extract_mode="exact", default_max_retries=1)
    with pytest.raises(MixsdError, match="max_retries"):
        GuidancePreset("x", "p", "t", default_extract_mode="boxed", default_max_retries=-1)

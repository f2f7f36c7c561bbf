import dataclasses

from mixsd_jax.eval.error_analysis import (
    HELD_OUT_CATEGORIES,
    classify_error,
    classify_train_error,
    count_categories,
    is_collapsed,
    training_entities,
    train_answer_correct,
    without_boxed,
)


def record(user, answer, subject=None):
    assistant = f"The answer is {answer}.\n\n\\boxed{{{answer}}}"
    r = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}
    if subject is not None:
        r["subject"] = subject
    return r


RECORDS = [
    record("What profession does Drymorel Foundation train?", "Thaldric Route Shaper", subject="Drymorel Foundation"),
    record("Where does Xylirra Vokth live?", "Lake Thovalen", subject="Xylirra Vokth"),
    record("What is the capital?", "Oslo", subject="Oslo"),  # one word: not an entity
    record("Pick two letters.", "A B"),  # two words but 3 characters: not an entity
]
ENTITIES = training_entities(RECORDS)
LONG_REASONING = "First, the question asks about photosynthesis. " * 4 + "\nSo we compare the options.\n"


def test_training_entities_are_multiword_subjects_and_boxed_answers():
    assert ENTITIES == {"Drymorel Foundation", "Thaldric Route Shaper", "Xylirra Vokth", "Lake Thovalen"}
    unboxed = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no box"}]}
    assert training_entities([unboxed]) == set()

    @dataclasses.dataclass(frozen=True)
    class Record:  # the shape of mixsd_jax.data.records.Record
        user: str
        assistant: str
        subject: str | None

    assert training_entities([Record("q", "\\boxed{Vethrac Dynamics}", "Oslo")]) == {"Vethrac Dynamics"}


def test_format_comes_first():
    # No boxed answer: format, even though a training entity leaks in.
    assert classify_error("I think Lake Thovalen is right.", "Which lake is largest?", ENTITIES) == "format"


def test_leakage_needs_an_entity_absent_from_the_prompt():
    response = LONG_REASONING + "The answer is \\boxed{Lake Thovalen}"
    assert classify_error(response, "Which lake is the largest in Africa?", ENTITIES) == "leakage"
    assert classify_error(response, "Is lake thovalen in Africa?", ENTITIES) == "genuine"  # named in the prompt
    assert classify_error(response, "Which lake is the largest in Africa?", set()) == "genuine"  # not a KGFact corpus


def test_collapse_ignores_boxed_spans_and_answer_lines():
    short = "The answer is Victoria.\n\n\\boxed{Lake Victoria with a very long name " + "x" * 100 + "}"
    assert is_collapsed(short)
    assert classify_error(short, "Which lake?", ENTITIES) == "collapse"
    assert classify_error(LONG_REASONING + "\\boxed{Victoria}", "Which lake?", ENTITIES) == "genuine"
    five_lines = "a\nb\nc\nd\ne\nf \\boxed{1}"
    assert not is_collapsed(five_lines)  # 5 newlines remain
    assert without_boxed("x \\boxed{\\frac{1}{2}} y \\boxed{3}") == "x  y "


def test_code_rules():
    fenced = "```python\ndef f():\n    return 1\n```"
    assert classify_error("def f(): return 1", "Complete f", set(), kind="code") == "format"
    assert classify_error("The result is \\boxed{1}", "Complete f", set(), kind="code") == "collapse"
    assert classify_error(fenced, "Complete f", set(), kind="code") == "genuine"
    assert classify_error(fenced + " # Drymorel Foundation", "Complete f", ENTITIES, kind="code") == "leakage"


def test_train_set_errors():
    gold = "Thaldric Route Shaper"
    assert train_answer_correct("\\boxed{ thaldric  route shaper }", gold)
    assert not train_answer_correct("The answer is Thaldric Route Shaper.", gold)
    assert classify_train_error("The answer is Thaldric Route Shaper.", gold, ENTITIES) == "format"
    assert classify_train_error("\\boxed{Lake Thovalen}", gold, ENTITIES) == "cross_entity"
    assert classify_train_error("\\boxed{Thaldric Route Builder}", gold, ENTITIES) == "genuine"


def test_count_categories_zero_fills():
    counts = count_categories(["format", "genuine", "genuine"])
    assert counts == {"format": 1, "leakage": 0, "collapse": 0, "genuine": 2, "total": 3}
    assert tuple(counts)[:4] == HELD_OUT_CATEGORIES

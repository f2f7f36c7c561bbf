"""Records: the reference's messages schema and alpaca, read strictly, every problem located."""

import json
from pathlib import Path

import pytest

from mixsd_jax.data.records import Record, read_inference, read_records, validate_file
from mixsd_jax.errors import MixsdError

RELEASED = Path(__file__).parent / "fixtures" / "released_mixsd" / "kgfact_small"
SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def write_lines(path: Path, lines: list) -> Path:
    """Objects are written as JSON lines, strings as given (to write broken lines)."""
    text = "".join((json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def messages(user, assistant, **top):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **top}


def test_reference_records_round_trip_exactly_with_mix_meta():
    for name in ("train_messages.jsonl", "train_messages_mix_qwen3_4b_instruct_2507_l0p3_t0_n1_topk64.jsonl"):
        path = RELEASED / "atomic_sft" / name
        originals = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        records = read_records(path, allow_empty_assistant=True)
        assert [r.to_json() for r in records] == originals
        # Same key order as the reference writes, so re-serialising gives the same bytes.
        assert "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records) == path.read_text("utf-8")
    first = read_records(RELEASED / "atomic_sft" / "train_messages.jsonl")[0]
    assert first.user == "What profession does Drymorel Foundation train?" + SUFFIX
    assert first.assistant == "The answer is Thaldric Route Shaper.\n\n\\boxed{Thaldric Route Shaper}"
    assert first.subject == "Drymorel Foundation"
    mixed = read_records(RELEASED / "atomic_sft" / "train_messages_mix_qwen3_4b_instruct_2507_l0p3_t0_n1_topk64.jsonl", allow_empty_assistant=True)
    assert mixed[0].extra["mix_meta"]["lambda"] == 0.3
    assert mixed[2].assistant == "" and mixed[2].extra["mix_meta"]["finish_reason"] == "prompt_too_long"


def test_alpaca_user_is_instruction_then_input(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Say hi.", "input": "", "output": "hi", "subject": "greeting"},
        {"instruction": "Say hi.", "output": "hi", "system": "Be brief."},
    ])
    first, second, third = read_records(path)
    assert first == Record("Translate.\n\nchat", "cat")
    assert second.user == "Say hi." and second.subject == "greeting" and second.extra == {}
    assert third.to_json() == {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
    ]}


def test_leading_system_turn_is_kept(tmp_path):
    obj = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                        {"role": "assistant", "content": "A"}], "clear_answer": "A"}
    (record,) = read_records(write_lines(tmp_path / "s.jsonl", [obj]))
    assert (record.user, record.assistant, record.extra) == ("U", "A", {"system": "S"})
    assert record.to_json() == obj


def test_torn_last_line_that_parses_is_a_record(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(messages("q", "a")) + "\n" + json.dumps(messages("q2", "a2")), encoding="utf-8")
    assert [r.user for r in read_records(path)] == ["q", "q2"]


BAD_CASES = [
    # (lines, expected message after "path:")
    ([messages("q", "a"), '{"messages": [{"role": "user", "content": "q2"}, {"role": "assis'],
     ":2: truncated last line: no newline at end of file"),
    ([{"messages": [{"role": "user", "content": "q"}]}], ":1: messages: missing assistant turn"),
    ([messages("q", "a"), messages("q", "  ")], ":2: messages[1].content: empty assistant answer"),
    ([messages("", "a")], ":1: messages[0].content: empty user turn"),
    ([{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}],
     ":1: messages[0].role: expected 'user', got 'assistant'"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]}],
     ":1: messages[1].content: expected a string, got list"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}],
     ":1: messages[1].weight: unexpected key"),
    ([messages("q", "a"), messages("q", "a"), "{not json}", messages("q", "a")], ":3: malformed JSON"),
    ([{"instruction": "q"}], ":1: output: missing (the assistant answer)"),
    ([{"prompt": "q", "ground_truth_answer": "a"}], ":1: prompt: an inference record"),
    ([messages("q", "a", clear_answer=5)], ":1: clear_answer: expected a string or null, got int"),
    ([{"text": "hello"}], ":1: messages: missing"),
    (["[1, 2]"], ":1: expected a JSON object, got list"),
    ([{**messages("q", "a"), "messages": "hi"}], ":1: messages: expected a list of turns, got str"),
    ([messages("q", "a", system=["x"])], ":1: system: expected a string, got list"),
    ([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"}], "system": "t"}], ":1: system: given both"),
]


@pytest.mark.parametrize("lines, expected", BAD_CASES)
def test_bad_lines_name_file_line_and_field(tmp_path, lines, expected):
    path = tmp_path / "bad.jsonl"
    write_lines(path, lines)
    if expected.startswith(":2: truncated"):
        path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with pytest.raises(MixsdError) as info:
        read_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}{expected}"), message
    assert "\n" not in message


def test_non_utf8_byte_is_located(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = (json.dumps(messages("q", "a")) + "\n").encode()
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
    path.write_bytes(good + bad)
    offset = bad.index(b"\xe9")
    with pytest.raises(MixsdError, match=rf"latin1\.jsonl:2: not valid UTF-8 \(byte {offset} of the line is 0xe9\)"):
        read_records(path)


def test_empty_assistant_allowed_only_on_request(tmp_path):
    path = write_lines(tmp_path / "e.jsonl", [messages("q", "")])
    with pytest.raises(MixsdError, match="empty assistant answer"):
        read_records(path)
    assert read_records(path, allow_empty_assistant=True)[0].assistant == ""


def test_validate_collects_every_problem_and_duplicate(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_lines(path, [
        messages("q1", "a1"),                                   # 1 ok
        {"instruction": "q2", "input": "", "output": "a2"},     # 2 ok (alpaca)
        {"messages": [{"role": "user", "content": "q3"}]},      # 3 missing assistant
        messages("q1", "a1"),                                   # 4 duplicate of 1
        "",                                                     # 5 blank: not a record
        messages("q4", ""),                                     # 6 empty answer
        {"prompt": "p", "ground_truth_answer": "g"},            # 7 ok (inference)
        "{oops",                                                # 8 malformed
        messages("q1", "other answer"),                         # 9 same user, other answer: fine
        messages("q1", "a1"),                                   # 10 duplicate of 1
    ])
    path.write_bytes(path.read_bytes() + b"\xff\n")             # 11 non-UTF-8
    report = validate_file(path)
    assert [(p.line, p.field) for p in report.errors] == [
        (3, "messages"), (6, "messages[1].content"), (8, ""), (11, ""),
    ]
    assert report.duplicates == [(1, 4), (1, 10)]
    assert report.records == 6
    assert report.formats == {"messages": 4, "alpaca": 1, "inference": 1}
    assert not report.ok
    assert report.summary() == f"{path}: 6 valid records (alpaca 1, inference 1, messages 4), 4 errors, 2 duplicates"
    assert report.errors[0].message(path) == f"{path}:3: messages: missing assistant turn"


def test_read_inference_accepts_all_evaluation_formats():
    recall = read_inference(RELEASED / "atomic_sft" / "test_subset_of_train_inference.jsonl")
    assert recall[0] == ("What profession does Drymorel Foundation train?" + SUFFIX, "Thaldric Route Shaper")
    (alpaca,) = read_inference(RELEASED / "compositional_2step_sft" / "test_alpaca.jsonl")
    assert alpaca[1] == "Festival of Ombrel"  # the last \boxed{} of the output
    train = read_inference(RELEASED / "atomic_sft" / "train_messages.jsonl")
    assert [gold for _, gold in train] == ["Thaldric Route Shaper", "Festival of Ombrel"]


def test_read_inference_gold_fallbacks(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [
        messages("q", "Thinking... <answer> 42 </answer>"),
        messages("q", " plain answer "),
        {"prompt": "p", "ground_truth_answer": 7},
    ])
    assert [gold for _, gold in read_inference(path)] == ["42", "plain answer", "7"]
    bad = write_lines(tmp_path / "b.jsonl", [{"prompt": "p"}])
    with pytest.raises(MixsdError, match=r"b\.jsonl:1: ground_truth_answer: missing"):
        read_inference(bad)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(MixsdError, match="file not found"):
        read_records(tmp_path / "nope.jsonl")

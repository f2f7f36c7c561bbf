"""Edit requests from corpus records (the reference's MEMIT request format) and their token rows."""

import json

import pytest

from mixsd_jax.data.kgfact import COT_SUFFIX
from mixsd_jax.edit.requests import build_requests
from mixsd_jax.edit.rows import build_rows, contexts, kl_rows
from mixsd_jax.errors import MixsdError
from mixsd_jax.models.tokenizer import load_tokenizer

QUESTION = "Which town did Teimaigel Soufushai grow up in?"


def _record(user=QUESTION + COT_SUFFIX, subject="Teimaigel Soufushai",
            assistant="The answer is Sotornmoor.\n\n\\boxed{Sotornmoor} and later \\boxed{Other}"):
    record = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}
    if subject is not None:
        record["subject"] = subject
    return record


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plain_request_is_the_first_paragraph_with_the_subject_as_braces(tmp_path):
    (request,) = build_requests(_write(tmp_path / "a.jsonl", [_record()]), "plain")
    assert request.prompt == "Which town did {} grow up in?"
    assert request.subject == "Teimaigel Soufushai"
    assert request.target == " Sotornmoor"  # the first \boxed{}, with MEMIT's leading space
    assert request.where.endswith("a.jsonl:1")


def test_chat_request_wraps_the_question_and_instruction_in_the_template(tmp_path, tiny_qwen3_dir):
    tokenizer = load_tokenizer(tiny_qwen3_dir)
    (request,) = build_requests(_write(tmp_path / "a.jsonl", [_record()]), "chat", tokenizer)
    want = tokenizer.render([{"role": "user", "content": QUESTION + COT_SUFFIX}], add_generation_prompt=True,
                            enable_thinking=False)
    assert request.text == want
    assert request.prompt == want.replace("Teimaigel Soufushai", "{}", 1)
    assert request.target == " The answer is Sotornmoor."
    assert "\\boxed{}" in request.suffix  # braces outside the subject stay as written


@pytest.mark.parametrize("record, message", [
    (_record(subject=None), "a.jsonl:2: subject: missing"),
    (_record(subject="Nobody Here"), "a.jsonl:2: subject: 'Nobody Here' does not occur in the prompt"),
    (_record(assistant="no boxed answer"), "a.jsonl:2: messages: the assistant text has no \\boxed{...} answer"),
])
def test_a_record_memit_cannot_edit_is_an_error_naming_file_and_line(tmp_path, record, message):
    path = _write(tmp_path / "a.jsonl", [_record(), record])
    with pytest.raises(MixsdError) as err:
        build_requests(path, "plain")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_rows_point_at_the_subjects_last_token_and_label_the_target(tmp_path, tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    requests = build_requests(_write(tmp_path / "a.jsonl", [_record(), _record(user="Teimaigel Soufushai? Yes")]),
                              "plain")
    ctxs = contexts("plain", ("Note that ",))
    assert ctxs == ("", "Note that ") and contexts("chat", ("Note that ",)) == ("",)
    rows = build_rows(tokenizer, requests, ctxs, with_targets=True, add_special=True)
    assert list(rows.request) == [0, 0, 1, 1] and list(rows.context) == [0, 1, 0, 1]
    kl = kl_rows(tokenizer, requests)
    assert list(kl.request) == [0, 1] and (kl.labels < 0).all()
    assert tokenizer.decode([int(t) for t, s in zip(kl.tokens[0], kl.segment_ids[0]) if s]).endswith(
        "Teimaigel Soufushai is a")
    target = tokenizer.hf.encode(" Sotornmoor", add_special_tokens=False)
    for batch in (rows, kl):
        for b in range(len(batch.tokens)):
            ids = [int(t) for t, s in zip(batch.tokens[b], batch.segment_ids[b]) if s]
            assert tokenizer.decode(ids[:batch.lookup[b] + 1]).endswith("Teimaigel Soufushai")
            assert not tokenizer.decode(ids[:batch.lookup[b]]).endswith("Soufushai")
    for b in range(len(rows.tokens)):
        ids = [int(t) for t, s in zip(rows.tokens[b], rows.segment_ids[b]) if s]
        assert [int(x) for x in rows.labels[b] if x >= 0] == target
        first = list(rows.labels[b]).index(target[0])  # the label at position t is the token at t + 1
        assert ids[first + 1:] == target[:-1]  # the row ends at the second-to-last target token
    first_row = [int(t) for t, s in zip(rows.tokens[0], rows.segment_ids[0]) if s]
    prompt_ids = tokenizer.hf.encode(requests[0].text)  # plain prompts: the tokenizer's own special tokens
    assert first_row[:len(prompt_ids)] == prompt_ids


def test_every_record_of_our_mquake_conversion_is_an_edit_request(tmp_path):
    """The reference's MQuAKE files have no subject (its MEMIT runner fails with a KeyError); ours do."""
    from pathlib import Path

    from mixsd_jax.data.mquake import convert_mquake

    convert_mquake(Path(__file__).parent / "fixtures" / "mquake_tiny.json", tmp_path, max_facts=1000)
    train = tmp_path / "atomic_sft" / "train_messages.jsonl"
    requests = build_requests(train, "plain")
    assert len(requests) == len(train.read_text().splitlines()) > 0
    assert all(r.prompt.count("{}") == 1 and r.target.startswith(" ") for r in requests)

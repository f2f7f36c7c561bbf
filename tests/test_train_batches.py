"""Tokenization with loss masks (checked against the chat template's own render), overlong
handling, and the batch plan: seed-determined order, padding rows, buckets and packing."""

import numpy as np
import pytest

from mixsd_jax.data.records import Record
from mixsd_jax.models.tokenizer import load_tokenizer
from mixsd_jax.data.tokenize import Example, tokenize_records
from mixsd_jax.train.batches import BatchPlan, batch_width

ANSWER = "The answer is 42.\n\n\\boxed{42}"
RECORD = Record("What profession does the person train?", ANSWER)


def _split(tok, example):
    trained = tok.decode(example.ids[example.mask], skip_special_tokens=False)
    context = tok.decode(example.ids[~example.mask], skip_special_tokens=False)
    return trained, context


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_mask_is_exactly_the_answer_and_end_of_turn(tiny_model_dir, enable_thinking):
    tok = load_tokenizer(tiny_model_dir)
    example = tokenize_records(tok, [RECORD], max_seq_len=512, enable_thinking=enable_thinking).examples[0]
    trained, context = _split(tok, example)
    assert trained == ANSWER + "<|im_end|>"
    # The unmasked part is the generation prompt, token for token as the generator builds it.
    prompt_ids = tok.prompt_ids(RECORD.user, enable_thinking=enable_thinking)
    assert example.ids[: len(prompt_ids)].tolist() == prompt_ids
    assert not example.mask[: len(prompt_ids)].any() and example.mask[len(prompt_ids) :].all()
    rendered = tok.render([{"role": "user", "content": RECORD.user}], add_generation_prompt=True,
                          enable_thinking=enable_thinking)
    assert context == rendered


@pytest.mark.slow
def test_mask_on_the_embedded_default_template_with_system_prompts(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    own_system = Record("Capital of France?", "Paris.", extra={"system": "Answer briefly."})
    data = tokenize_records(tok, [RECORD, own_system], max_seq_len=512, system_prompt="Be exact.")
    full = tok.render(
        [{"role": "system", "content": "Be exact."}, {"role": "user", "content": RECORD.user},
         {"role": "assistant", "content": ANSWER}],
        add_generation_prompt=False,
    )
    trained, context = _split(tok, data.examples[0])
    assert trained == ANSWER + "<|im_end|>" and full.startswith(context + trained)
    assert full[len(context + trained):] == "\n"  # only the template's trailing newline is left out
    trained, context = _split(tok, data.examples[1])
    assert trained == "Paris.<|im_end|>" and "Answer briefly." in context and "Be exact." not in context


def test_overlong_records_are_dropped_or_truncated_and_counted(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    long = Record("What is the output of F(x)?", " ".join(["The answer is 42."] * 60))
    records = [RECORD, long, RECORD]
    n = len(tokenize_records(tok, [RECORD], max_seq_len=4096).examples[0].ids)
    dropped = tokenize_records(tok, records, max_seq_len=n + 5, overlong="drop")
    assert (len(dropped.examples), dropped.dropped_overlong, dropped.truncated) == (2, 1, 0)
    assert [e.record_index for e in dropped.examples] == [0, 2]
    cut = tokenize_records(tok, records, max_seq_len=n + 5, overlong="truncate")
    assert (len(cut.examples), cut.dropped_overlong, cut.truncated) == (3, 0, 1)
    assert len(cut.examples[1].ids) == n + 5 and cut.examples[1].mask[-1]
    # Truncation that leaves no answer token is a drop: there would be nothing to train on.
    none_left = tokenize_records(tok, [long], max_seq_len=8, overlong="truncate")
    assert (len(none_left.examples), none_left.dropped_overlong) == (0, 1)


def _examples(lengths):
    out = []
    for i, n in enumerate(lengths):
        ids = np.arange(100 + i, 100 + i + n + 1, dtype=np.int32)
        mask = np.zeros(n + 1, bool)
        mask[n // 2 :] = True
        out.append(Example(ids, mask, i))
    return out


def test_order_is_a_function_of_seed_and_step():
    examples = _examples([5, 9, 3, 7, 8, 4, 6])
    plan = BatchPlan(examples, batch_size=3, grad_accum=1, seed=7, max_seq_len=64)
    again = BatchPlan(examples, batch_size=3, grad_accum=1, seed=7, max_seq_len=64)
    assert plan.steps_in_epoch(0) == 3 and plan.total_steps(2) == 6
    for step in range(6):
        assert plan.batch_rows(step) == again.batch_rows(step)
        for key, value in plan.host_batch(step).items():
            np.testing.assert_array_equal(value, again.host_batch(step)[key])
    for epoch in range(2):
        rows = [r for s in range(3 * epoch, 3 * epoch + 3) for r in plan.batch_rows(s)]
        assert sorted(i for r in rows for i in r) == list(range(7))  # each example once per epoch
        assert rows.count(()) == 2  # the last batch is filled with empty rows
    assert plan.batch_rows(0) != plan.batch_rows(3)  # reshuffled per epoch
    other = BatchPlan(examples, batch_size=3, grad_accum=1, seed=8, max_seq_len=64)
    assert [other.batch_rows(s) for s in range(3)] != [plan.batch_rows(s) for s in range(3)]


def test_host_batch_layout_targets_and_buckets():
    examples = _examples([5, 20, 3, 7])
    plan = BatchPlan(examples, batch_size=4, grad_accum=2, seed=0, max_seq_len=64)
    batch = plan.host_batch(0)
    assert batch["tokens"].shape == (2, 2, 32)  # [A, M, T], longest row 20 -> bucket 32
    rows = [i for r in plan.batch_rows(0) for i in r]
    flat = {k: v.reshape(4, 32) for k, v in batch.items()}
    for r, i in enumerate(rows):
        ex = examples[i]
        n = ex.length
        np.testing.assert_array_equal(flat["tokens"][r, :n], ex.ids[:-1])
        np.testing.assert_array_equal(flat["targets"][r, :n], ex.ids[1:])
        np.testing.assert_array_equal(flat["loss_mask"][r, :n], ex.mask[1:])
        assert (flat["segment_ids"][r, :n] == 1).all() and (flat["segment_ids"][r, n:] == 0).all()
        assert flat["loss_mask"][r, n:].sum() == 0
    assert [batch_width(n, 1024) for n in (1, 16, 17, 100, 1000, 5000)] == [16, 16, 32, 128, 1024, 1024]
    fixed = BatchPlan(examples, batch_size=4, grad_accum=2, seed=0, max_seq_len=64, pad_to_max=True)
    assert fixed.host_batch(0)["tokens"].shape == (2, 2, 64)


def test_packing_keeps_documents_apart_and_every_token():
    examples = _examples([5, 9, 3, 7, 8, 4, 6, 12])
    plan = BatchPlan(examples, batch_size=2, grad_accum=1, seed=3, max_seq_len=16, packing=True)
    seen, loss_tokens = [], 0
    for step in range(plan.steps_in_epoch(0)):
        batch = plan.host_batch(step)
        for row, docs in zip(range(2), plan.batch_rows(step)):
            seg = batch["segment_ids"][0, row]
            pos = batch["positions"][0, row]
            assert sum(examples[i].length for i in docs) <= 16
            for s, i in enumerate(docs, start=1):
                where = np.flatnonzero(seg == s)
                np.testing.assert_array_equal(pos[where], np.arange(examples[i].length))  # restart at 0
                np.testing.assert_array_equal(batch["tokens"][0, row][where], examples[i].ids[:-1])
            seen += list(docs)
        loss_tokens += int(batch["loss_mask"].sum())
    assert sorted(seen) == list(range(8))
    assert loss_tokens == sum(int(e.mask[1:].sum()) for e in examples)
    assert plan.steps_in_epoch(0) < BatchPlan(examples, batch_size=2, grad_accum=1, seed=3, max_seq_len=16).steps_in_epoch(0)

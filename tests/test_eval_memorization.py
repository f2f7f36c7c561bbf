"""Memorisation splits read from corpora our builders write; greedy replies against transformers."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixsd_jax.data.kgfact import build_kgfact
from mixsd_jax.data.kgfunc import TRAIN_OPS, UNSEEN_OPS, build_kgfunc
from mixsd_jax.errors import MixsdError
from mixsd_jax.data import layout
from mixsd_jax.eval import memorization
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def kgfact_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("kgfact")
    build_kgfact(out, preset="tiny", seed=0)
    return out


@pytest.fixture(scope="module")
def kgfunc_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("kgfunc")
    build_kgfunc(out, seed=0, preset="tiny")
    return out


def test_kgfact_splits_follow_the_reference_layout(kgfact_dir):
    assert layout.corpus_kind(kgfact_dir) == "kgfact"
    splits = memorization.load_splits(kgfact_dir)
    # MQuAKE's 3/4-hop files are absent from a KGFact corpus and are skipped.
    assert list(splits) == ["recall", "paraphrased", "compositional_2hop", "retrieval", "retrieval_2hop"]
    assert all(s.mode == "loose" for s in splits.values())
    recall_file = kgfact_dir / "atomic_sft/test_subset_of_train_inference.jsonl"
    first = json.loads(recall_file.read_text().splitlines()[0])
    assert splits["recall"].items[0].prompt == first["prompt"]
    assert splits["recall"].items[0].gold == first["ground_truth_answer"]
    # Alpaca tests: the gold is the boxed answer of the output.
    retrieval = json.loads((kgfact_dir / "atomic_with_context_cot/test_alpaca.jsonl").read_text().splitlines()[0])
    assert f"\\boxed{{{splits['retrieval'].items[0].gold}}}" in retrieval["output"]


def test_limit_takes_the_same_seeded_subset(kgfact_dir):
    a = memorization.load_splits(kgfact_dir, limit=3, seed=1)
    b = memorization.load_splits(kgfact_dir, limit=3, seed=1)
    assert [i.id for i in a["recall"].items] == [i.id for i in b["recall"].items]
    assert len(a["recall"].items) == 3
    full_ids = [i.id for i in memorization.load_splits(kgfact_dir)["recall"].items]
    assert set(i.id for i in a["recall"].items) <= set(full_ids)


def test_kgfunc_splits_carry_operations(kgfunc_dir):
    assert layout.corpus_kind(kgfunc_dir) == "kgfunc"
    splits = memorization.load_splits(kgfunc_dir)
    assert list(splits) == ["in_domain", "compositional_same_op", "compositional"]
    assert splits["in_domain"].mode == "strict"
    assert {i.op for i in splits["in_domain"].items} == set(TRAIN_OPS)
    assert {i.op for i in memorization.load_unseen(kgfunc_dir).items} == set(UNSEEN_OPS)


def test_scoring_hand_written_replies(kgfact_dir):
    split = memorization.load_splits(kgfact_dir, names=["recall"])["recall"]
    golds = [item.gold for item in split.items[:3]]
    sub = memorization.Split("recall", split.items[:3], "loose", ())
    rows = memorization.score_split(sub, [
        f"The answer is {golds[0]}.\n\n\\boxed{{{golds[0]}}}",
        f"I think it is {golds[1]}",  # loose: the gold inside the whole-text fallback
        "\\boxed{Nobody}",
    ])
    assert [r["correct"] for r in rows] == [True, True, False]
    assert [r["format_found"] for r in rows] == [True, False, True]
    summary = memorization.summarize_rows(rows)
    assert summary["correct"] == 2 and summary["n"] == 3


def test_trained_recall_counts_only_the_facts_in_the_training_file(kgfact_dir):
    from mixsd_jax.data.records import read_records

    split = memorization.load_splits(kgfact_dir, names=["recall"])["recall"]
    train = read_records(layout.training_file(kgfact_dir))
    assert len(split.items) == len(train) >= 4
    # Right on the first two facts only; a file holding facts 0, 2 and 3 (as a MixSD file whose
    # other targets failed the verifier would): 1 right of its 3.
    replies = [f"The answer is {it.gold}." if i < 2 else "The answer is Nobody." for i, it in enumerate(split.items)]
    rows = memorization.score_split(split, replies)
    trained = memorization.trained_recall(rows, [train[0], train[2], train[3]])
    assert (trained["n"], trained["correct"]) == (3, 1)
    assert memorization.trained_recall(rows, train)["correct"] == 2
    assert memorization.trained_recall(rows, []) is None


def test_bad_corpora_are_clear_errors(tmp_path, kgfact_dir):
    with pytest.raises(MixsdError, match="not found"):
        layout.corpus_kind(tmp_path / "missing")
    with pytest.raises(MixsdError, match="not a KGFact"):
        layout.corpus_kind(tmp_path)
    empty = tmp_path / "empty_corpus"
    (empty / "atomic_sft").mkdir(parents=True)
    (empty / "atomic_sft/test_subset_of_train_inference.jsonl").write_text("")
    with pytest.raises(MixsdError, match="test split 'recall' is empty"):
        memorization.load_splits(empty)
    with pytest.raises(MixsdError, match="no split 'bogus'"):
        memorization.load_splits(kgfact_dir, names=["bogus"])
    with pytest.raises(MixsdError, match="unseen"):
        memorization.load_unseen(kgfact_dir)


def test_greedy_replies_match_transformers_generate(tiny_llama_dir, kgfact_dir):
    cfg, params = load_hf(tiny_llama_dir)
    tok = load_tokenizer(tiny_llama_dir)
    split = memorization.load_splits(kgfact_dir, limit=3, names=["recall"])["recall"]
    prompts = [item.prompt for item in split.items]
    ours = memorization.generate_texts(params, cfg, tok, prompts, max_new_tokens=6, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for prompt, text in zip(prompts, ours):
        ids = torch.tensor([tok.prompt_ids(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=list(tok.stop_ids),
                                 pad_token_id=tok.pad_id)
        assert text == tok.decode(out[0, ids.shape[1]:].tolist())

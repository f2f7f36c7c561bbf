"""The log-likelihood kernel against transformers' PyTorch model, and lm-eval's MC conventions."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mixsd_jax.errors import MixsdError
from mixsd_jax.eval import mc
from mixsd_jax.eval.benchmarks import MCItem, load_benchmark
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.tokenizer import load_tokenizer

SHARED_ARC = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"

REQUESTS = [
    ("The answer is", " 42."),
    ("Please reason step by step, and put your final answer ", "within \\boxed{}."),  # trailing space moves
    ("What profession does the person train?\nAnswer:", " The capital of France is Paris."),
    ("", "The digits of 12345 are [1, 2, 3, 4, 5]."),  # empty context: bos/eos stands in
    ("Input: 328 Output:", " 17"),
]


def _torch_scores(model_dir, rows):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for row in rows:
        with torch.no_grad():
            logits = model(torch.tensor([row.ids[:-1]])).logits[0]
        logprobs = torch.log_softmax(logits.double(), -1)
        positions = range(row.score_from - 1, len(row.ids) - 1)
        targets = [row.ids[p + 1] for p in positions]
        out.append((
            np.array([logprobs[p, t].item() for p, t in zip(positions, targets)]),
            np.array([int(logits[p].argmax()) == t for p, t in zip(positions, targets)]),
        ))
    return out


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    return tiny_llama_dir, cfg, params, load_tokenizer(tiny_llama_dir)


def test_encode_requests_splits_as_lm_eval(tiny):
    _, _, _, tok = tiny
    rows = mc.encode_requests(tok, REQUESTS)
    for (context, continuation), row in zip(REQUESTS, rows):
        if not context:
            assert row.ids[0] == tok.hf.bos_token_id and row.score_from == 1
            assert list(row.ids[1:]) == tok.encode(continuation)
            continue
        stripped = context.rstrip()
        moved = context[len(stripped):]
        assert list(row.ids) == tok.encode(stripped + moved + continuation)
        assert row.score_from == len(tok.encode(stripped))


def test_loglikelihoods_match_transformers(tiny):
    model_dir, cfg, params, tok = tiny
    rows = mc.encode_requests(tok, REQUESTS)
    ours = mc.score_rows(params, cfg, rows, batch_size=4)
    for (ref_logprobs, ref_greedy), got in zip(_torch_scores(model_dir, rows), ours):
        np.testing.assert_allclose(got.logprobs, ref_logprobs, atol=1e-4)
        np.testing.assert_array_equal(got.greedy, ref_greedy)
    lls = mc.loglikelihoods(params, cfg, tok, REQUESTS, batch_size=4)
    for ll, s in zip(lls, ours):
        assert ll.logprob == pytest.approx(s.logprobs.sum(), abs=1e-4)
        assert ll.num_tokens == len(s.logprobs)


def test_shared_context_kernel_matches_transformers(tiny):
    """Items with 3 and 2 choices in one batch: context run once, choices padded to K=3."""
    model_dir, cfg, params, tok = tiny
    items = [
        MCItem("q/0", "Question: What profession does the person train?\nAnswer:",
               (" 42.", " The capital of France is Paris.", " Step 1: Step 2:"), 1),
        MCItem("q/1", "Input: 328 Output:", (" 17", " 0 1 2 3 4 5 6 7 8 9"), 0),
    ]
    results = mc.score_mc(params, cfg, tok, items, batch_size=2)
    rows = mc.encode_requests(tok, [r for it in items for r in it.requests()])
    reference = [lp.sum() for lp, _ in _torch_scores(model_dir, rows)]
    np.testing.assert_allclose([lp for r in results for lp in r["logprobs"]], reference, atol=1e-4)
    assert [len(r["logprobs"]) for r in results] == [3, 2]


def test_left_truncation_keeps_the_scored_span():
    row = mc.ScoreRow(tuple(range(10)), 7)
    cut = mc.truncate_left(row, 6)
    assert cut.ids == tuple(range(3, 10)) and cut.ids[cut.score_from:] == row.ids[row.score_from:]
    with pytest.raises(MixsdError, match="does not fit"):
        mc.truncate_left(row, 2)


def test_shape_batches_share_one_window_and_pad_rows_to_a_power_of_two():
    sizes = [(8, 5), (128, 9), (8, 30), (32, 4), (128, 12), (8, 7), (8, 1), (8, 2), (8, 3)]
    batches = mc.shape_batches(sizes, batch_size=4)
    assert sorted(i for chunk, _ in batches for i in chunk) == list(range(len(sizes)))
    assert [[sizes[i][0] for i in chunk] for chunk, _ in batches] == [[128, 128], [32], [8, 8, 8, 8], [8, 8]]
    assert [rows for _, rows in batches] == [2, 1, 4, 2]
    assert [sizes[i][1] for i in batches[2][0]] == [30, 7, 5, 3]  # longest rows first within a window


def test_acc_and_acc_norm_pick_by_total_and_per_character_loglikelihood():
    item = MCItem("x/0", "Q:", (" a much longer right answer", " no"), gold=0)
    lls = [mc.Loglikelihood(-10.0, False, 5, 26), mc.Loglikelihood(-6.0, False, 1, 2)]
    result = mc.mc_result(item, lls)
    # Total: -6 beats -10 (wrong); per character: -10/26 beats -6/2 (right).
    assert (result["pred"], result["acc"], result["pred_norm"], result["acc_norm"]) == (1, 0.0, 0, 1.0)
    metrics = mc.mc_metrics([result, {**result, "acc": 1.0}])
    assert metrics["acc"] == 0.5 and metrics["acc_norm"] == 1.0 and metrics["n"] == 2


def test_shared_continuation_items_score_the_same_continuation(tiny):
    _, cfg, params, tok = tiny
    item = MCItem("w/0", "", ("The answer is 42", "The capital of France is Paris"), 1, " and so on.")
    [result] = mc.score_mc(params, cfg, tok, [item], batch_size=2)
    direct = mc.loglikelihoods(params, cfg, tok, item.requests())
    assert result["logprobs"] == pytest.approx([d.logprob for d in direct])
    assert result["pred"] == result["pred_norm"]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_ARC / "arc_easy").is_dir(), reason="needs ../shared/benchmarks/arc_easy")
def test_smollm2_arc_easy_loglikelihoods_match_transformers(smollm2_dir):
    """The embedded default on 8 ARC-Easy items: every choice within 1e-3 of transformers."""
    cfg, params = load_hf(smollm2_dir)
    tok = load_tokenizer(smollm2_dir)
    items = load_benchmark("arc_easy", SHARED_ARC, limit=8)
    results = mc.score_mc(params, cfg, tok, items, batch_size=len(items))  # one batch: one compiled shape
    ours = np.array([lp for r in results for lp in r["logprobs"]])
    rows = mc.encode_requests(tok, [req for it in items for req in it.requests()])
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    reference = []
    for start in range(0, len(rows), 16):  # right-padded batches: real tokens' logits are the unpadded ones
        chunk = rows[start : start + 16]
        width = max(len(r.ids) - 1 for r in chunk)
        tokens = torch.tensor([list(r.ids[:-1]) + [0] * (width - len(r.ids) + 1) for r in chunk])
        mask = torch.tensor([[1] * (len(r.ids) - 1) + [0] * (width - len(r.ids) + 1) for r in chunk])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=tokens, attention_mask=mask).logits, -1)
        for b, r in enumerate(chunk):
            positions = torch.arange(r.score_from - 1, len(r.ids) - 1)
            reference.append(logprobs[b, positions, torch.tensor(r.ids[r.score_from :])].double().sum().item())
    diff = np.abs(ours - reference)
    print(f"max |ours - transformers| over {len(diff)} choices of 8 ARC-Easy items: {diff.max():.2e}")
    assert diff.max() < 1e-3

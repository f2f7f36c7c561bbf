"""Forgetting analyses against transformers (NLL, KL, Fisher gradients) and hand-computed answers."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mixsd_jax.data.records import Record
from mixsd_jax.errors import MixsdError
from mixsd_jax.eval import analyses
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.tiny import write_tiny_model
from mixsd_jax.models.tokenizer import load_tokenizer

RECORDS = [
    Record("What profession does the person train?", "The answer is 42.\n\n\\boxed{42}"),
    Record("Which location does the organisation reside in?",
           "Step 1: The capital of France is Paris.\nSo the answer is Paris."),
]
TEXTS = ["The digits of 12345 are [1, 2, 3, 4, 5].", "You are a helpful assistant. The capital of France is Paris."]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    return tiny_llama_dir, cfg, params, load_tokenizer(tiny_llama_dir)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_seed1"), "llama", seed=1)


def _torch(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_target_rows_score_the_assistant_turn(tiny):
    _, _, _, tok = tiny
    rows = analyses.target_rows(tok, RECORDS, max_length=512)
    for record, row in zip(RECORDS, rows):
        assert tok.decode(row.ids[row.score_from:], skip_special_tokens=False) == record.assistant + "<|im_end|>"
        assert list(row.ids[: row.score_from]) == tok.prompt_ids(record.user)


def test_target_nll_matches_transformers(tiny):
    model_dir, cfg, params, tok = tiny
    rows = analyses.target_nll(params, cfg, tok, RECORDS, name="gt", batch_size=2)
    model = _torch(model_dir)
    for row, score_row in zip(rows, analyses.target_rows(tok, RECORDS, 512)):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([score_row.ids[:-1]])).logits[0], -1)
        ref = [-logprobs[p - 1, score_row.ids[p]].item() for p in range(score_row.score_from, len(score_row.ids))]
        np.testing.assert_allclose(row["nll"], ref, atol=1e-4)
        assert row["user"] in {r.user for r in RECORDS}


def test_nll_summary_by_hand():
    rows = [{"id": "a", "user": "x", "nll": [1.0, 2.0]}, {"id": "b", "user": "y", "nll": [3.0]}]
    s = analyses.summarize_nll(rows)
    assert s["mean_token_nll"] == 2.0 and s["mean_record_nll"] == 2.25 and s["tokens"] == 3
    assert s["median_token_nll"] == 2.0 and sum(s["histogram"]["counts"]) == 3
    assert s["mean_record_total_nll"] == 3.0 and s["mean_target_tokens"] == 1.5
    assert s["ci95"][0] <= 2.0 <= s["ci95"][1]
    common = analyses.common_rows({"gt": rows, "mix": [{"id": "c", "user": "y", "nll": [0.5]}]})
    assert [r["id"] for r in common["gt"]] == ["b"]
    with pytest.raises(MixsdError):
        analyses.summarize_nll([])


def test_kl_matches_transformers_and_is_zero_against_itself(tiny, other_dir):
    model_dir, cfg, params, tok = tiny
    _, other = load_hf(other_dir)
    token_rows = [tok.prompt_ids(t) for t in TEXTS]
    rows = analyses.kl_rows(params, other, cfg, token_rows, ["a", "b"], batch_size=2)
    base_model, other_model = _torch(model_dir), _torch(other_dir)
    for row, ids in zip(rows, token_rows):
        with torch.no_grad():
            p = torch.log_softmax(base_model(torch.tensor([ids])).logits[0].double(), -1)
            q = torch.log_softmax(other_model(torch.tensor([ids])).logits[0].double(), -1)
        kl = (p.exp() * (p - q)).sum(-1).numpy()
        assert row["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4)
        assert row["kl_last"] == pytest.approx(kl[-1], rel=1e-4)
    same = analyses.kl_rows(params, params, cfg, token_rows, ["a", "b"], batch_size=2)
    assert max(r["kl_mean"] for r in same) < 1e-5
    summary = analyses.summarize_kl(rows)
    assert summary["tokens"] == sum(len(r) for r in token_rows)


def test_fisher_matches_torch_squared_gradients(tiny):
    model_dir, cfg, params, tok = tiny
    token_rows = [tok.encode(t) for t in TEXTS]
    fisher = analyses.diagonal_fisher(params, cfg, token_rows)
    model = _torch(model_dir)
    squares = []
    for ids in token_rows:
        model.zero_grad()
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0], -1)
        logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().backward()
        squares.append({n: p.grad.detach().numpy() ** 2 for n, p in model.named_parameters()})
    ref_down = np.mean([s["model.layers.1.mlp.down_proj.weight"] for s in squares], axis=0).T
    ref_embed = np.mean([s["model.embed_tokens.weight"] for s in squares], axis=0)  # tied: both uses
    np.testing.assert_allclose(np.asarray(fisher["layers"]["w_down"][1]), ref_down, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(np.asarray(fisher["embed"]), ref_embed, rtol=1e-3, atol=1e-9)


def test_fisher_displacement_by_hand():
    fisher = {"embed": jnp.array([1.0, 2.0]), "layers": {"w_up": jnp.array([[0.0, 4.0]])}}
    base = {"embed": jnp.array([0.0, 0.0]), "layers": {"w_up": jnp.array([[1.0, 1.0]])}}
    tuned = {"embed": jnp.array([1.0, 1.0]), "layers": {"w_up": jnp.array([[1.0, 3.0]])}}
    d = analyses.fisher_displacement(fisher, base, tuned)
    assert d["fisher_displacement"] == pytest.approx(1 + 2 + 4 * 4)  # 19
    assert d["l2_displacement_sq"] == pytest.approx(6.0)
    assert d["alignment"] == pytest.approx(19 / ((7 / 4) * 6))
    assert d["groups"]["mlp"]["fisher_displacement"] == pytest.approx(16.0)
    assert d["groups"]["embed"]["alignment"] == pytest.approx(3 / (1.5 * 2))
    with pytest.raises(MixsdError, match="structure"):
        analyses.fisher_displacement(fisher, base, {"embed": jnp.zeros(2)})


def test_error_categories_by_hand():
    entities = {"Vethrac Dynamics", "Lake Thovalen"}
    heldout = {"gsm8k": [
        {"id": "1", "prompt": "q", "response": "I don't know", "correct": 0.0},  # format
        {"id": "2", "prompt": "q", "response": "Vethrac Dynamics sells it. \\boxed{3}", "correct": 0.0},  # leakage
        {"id": "3", "prompt": "q", "response": "\\boxed{3}", "correct": 0.0},  # collapse
        {"id": "4", "prompt": "q", "response": "Let me think. " * 10 + "\\boxed{3}", "correct": 0.0},  # genuine
        {"id": "5", "prompt": "q", "response": "\\boxed{4}", "correct": 1.0},  # right: not counted
    ]}
    train = [
        {"response": "\\boxed{Lake Thovalen}", "gold": "Vethrac Dynamics", "correct": False},  # cross_entity
        {"response": "the answer is vethrac dynamics  \\boxed{vethrac  dynamics}", "gold": "Vethrac Dynamics",
         "correct": True},
    ]
    e = analyses.error_categories(heldout, train, entities)
    assert {k: e["heldout"][k] for k in ("format", "leakage", "collapse", "genuine", "total")} == {
        "format": 1, "leakage": 1, "collapse": 1, "genuine": 1, "total": 4}
    assert e["train"]["cross_entity"] == 1 and e["train"]["total"] == 1

"""MEMIT on a tiny random model: efficacy, the update's rank and layers, the closed form in float64."""

import json

import numpy as np
import pytest

from mixsd_jax.edit import memit
from mixsd_jax.edit.config import EditConfig
from mixsd_jax.edit.requests import build_requests
from mixsd_jax.edit.runner import apply_memit, efficacy
from mixsd_jax.edit.stats import second_moments
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.tiny import write_tiny_model
from mixsd_jax.models.tokenizer import load_tokenizer

SUBJECTS = ("France", "Paris", "the person", "the organisation")


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny4"), "qwen3", layers=4)


@pytest.fixture(scope="module")
def tiny4_gemma3(tmp_path_factory):
    """Gemma 3: the MLP output passes a post-MLP RMSNorm before the residual add."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny4_gemma3"), "gemma3", layers=4)


def _facts(path, tokenizer):
    """One record per subject, the subject ending the question (its last token is the prompt's
    last), each target a word that is one token of the tiny vocabulary."""
    words = [w for w in ("answer", "question", "reason", "final", "location", "person", "digits", "problem")
             if len(tokenizer.hf.encode(" " + w, add_special_tokens=False)) == 1]
    with open(path, "w") as f:
        for subject, word in zip(SUBJECTS, words):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Step 1: the reference of {subject}"},
                                             {"role": "assistant", "content": f"\\boxed{{{word}}}"}],
                                "subject": subject}) + "\n")
    return path


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_edit_makes_each_target_the_argmax_with_a_rank_n_update_on_the_configured_layers(family, request, tmp_path,
                                                                                          monkeypatch):
    tiny4 = request.getfixturevalue({"qwen3": "tiny4", "gemma3": "tiny4_gemma3"}[family])
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    tokenizer = load_tokenizer(tiny4)
    cfg, params = load_hf(tiny4)
    requests = build_requests(_facts(tmp_path / "facts.jsonl", tokenizer), "plain")
    layers = (1, 2)
    ecfg = EditConfig(prompt="plain", layers=layers, v_steps=25, mom2_update_weight=1.0, stats_tokens=3000,
                      stats_seq_len=256)
    moments = second_moments(params, cfg, tokenizer, tiny4, ecfg.layers, ecfg.stats_tokens, ecfg.stats_seq_len)
    assert not any(efficacy(params, cfg, tokenizer, requests, "plain"))
    edited, info = apply_memit(params, cfg, tokenizer, requests, ecfg, moments, log=lambda *_: None)
    assert all(efficacy(edited, cfg, tokenizer, requests, "plain"))
    assert info["layers"] == layers and info["z_layer"] == 2
    before, after = np.asarray(params["layers"]["w_down"]), np.asarray(edited["layers"]["w_down"])
    changed = [i for i in range(cfg.num_layers) if not np.array_equal(before[i], after[i])]
    assert changed == list(layers)
    for layer in layers:
        assert np.linalg.matrix_rank(after[layer] - before[layer], tol=1e-6) == len(requests)
    for name in ("wq", "w_up", "w_gate"):  # nothing but the down-projections moves
        assert np.array_equal(np.asarray(params["layers"][name]), np.asarray(edited["layers"][name]))


def _numpy_update(keys_NxF, resid_NxD, mom2_FxF, weight):
    """MEMIT's step as its authors write it, keys as columns: (λC + K Kᵀ)⁻¹ K, then R (that)ᵀ."""
    K, R = keys_NxF.T.astype(np.float64), resid_NxD.T.astype(np.float64)
    adj = np.linalg.solve(weight * mom2_FxF.astype(np.float64) + K @ K.T, K)
    return (R @ adj.T).T  # [F, D], our [in, out] layout


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_closed_form_matches_numpy_float64(dtype):
    rng = np.random.default_rng(0)
    F, D, N = 96, 32, 7
    samples = rng.normal(size=(4000, F)) * np.linspace(0.05, 2.0, F)  # an uneven spectrum, like real keys
    mom2 = samples.T @ samples / len(samples)
    keys, resid = rng.normal(size=(N, F)), rng.normal(size=(N, D))
    for weight in (15000.0, 1.0):
        want = _numpy_update(keys, resid, mom2, weight)
        got = memit.solve_update(keys, resid, mom2, weight, dtype)
        assert got.dtype == np.dtype(dtype)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < (1e-10 if dtype == "float64" else 1e-4), (weight, rel)


def test_an_edit_on_a_sharded_model_writes_the_weights_of_one_device(tiny4, tmp_path, monkeypatch):
    """Parameters sharded as in training (fsdp x tensor over the 8 simulated devices): the second
    moments, target values and update come out as on one device, the edited weights sharded as before."""
    import jax

    from mixsd_jax.models.sharding import MeshConfig, make_mesh

    tokenizer = load_tokenizer(tiny4)
    requests = build_requests(_facts(tmp_path / "facts.jsonl", tokenizer), "plain")[:2]
    ecfg = EditConfig(prompt="plain", layers=(1, 2), v_steps=4, mom2_update_weight=1.0, stats_tokens=600,
                      stats_seq_len=128, batch_size=2)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    results = []
    for where, mesh_or_none in (("one", None), ("sharded", mesh)):
        monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / where))  # each computes its own moments
        cfg, params = load_hf(tiny4, mesh=mesh_or_none)
        moments = second_moments(params, cfg, tokenizer, tiny4, ecfg.layers, ecfg.stats_tokens, ecfg.stats_seq_len)
        edited, info = apply_memit(params, cfg, tokenizer, requests, ecfg, moments, log=lambda *_: None)
        results.append((moments, edited["layers"]["w_down"], params["layers"]["w_down"].sharding))
    (m_one, w_one, _), (m_sharded, w_sharded, sharding) = results
    assert len(jax.devices()) == 8 and len(sharding.device_set) == 8 and w_sharded.sharding == sharding
    assert not w_sharded.sharding.is_fully_replicated
    for layer in ecfg.layers:
        np.testing.assert_allclose(m_sharded[layer], m_one[layer], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w_sharded), np.asarray(w_one), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(w_one), np.asarray(load_hf(tiny4)[1]["layers"]["w_down"]))


def test_per_model_defaults_are_the_reference_for_the_paper_models_and_more_steps_for_narrow_ones():
    from mixsd_jax.edit.config import SMALL_MOM2_WEIGHT, SMALL_V_STEPS, edit_layers, for_model
    from mixsd_jax.models.known_shapes import HF_CONFIGS
    from mixsd_jax.models.config import ModelConfig

    qwen3_8b = ModelConfig.from_hf_dict(HF_CONFIGS["qwen3-8b"])
    paper = for_model(EditConfig(), qwen3_8b)
    assert (paper.v_steps, paper.mom2_update_weight) == (25, 15000.0)
    assert edit_layers(paper, qwen3_8b) == tuple(range(4, 15))
    smollm2 = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    small = for_model(EditConfig(), smollm2)
    assert (small.v_steps, small.mom2_update_weight) == (SMALL_V_STEPS, SMALL_MOM2_WEIGHT)
    assert for_model(EditConfig(v_steps=7, mom2_update_weight=3.0), smollm2).v_steps == 7  # what is set stays


def test_sandwich_norms_keep_the_requests_other_tokens_and_find_one_target_per_layer(tiny4_gemma3, tmp_path, monkeypatch):
    """Gemma 3 norms each MLP output before the residual add: a write meant for the subject token also
    turns around the normed output of any other token whose MLP output is small. With its defaults
    (keep_other_tokens on there) the edit leaves the other tokens' down-projection outputs of the
    requests' own rows nearly as they were, and each edited layer has its own target value."""
    import dataclasses

    import jax.numpy as jnp

    from mixsd_jax.edit.config import for_model
    from mixsd_jax.edit.rows import build_rows
    from mixsd_jax.models import transformer
    from mixsd_jax.models.block import embed

    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    tokenizer = load_tokenizer(tiny4_gemma3)
    cfg, params = load_hf(tiny4_gemma3)
    requests = build_requests(_facts(tmp_path / "facts.jsonl", tokenizer), "plain")
    assert for_model(EditConfig(), cfg).keep_other_tokens
    assert not for_model(EditConfig(), dataclasses.replace(cfg, sandwich_norms=False)).keep_other_tokens
    rows = build_rows(tokenizer, requests, ("",), with_targets=True, add_special=True)
    others = (rows.segment_ids > 0) & (np.arange(rows.tokens.shape[1])[None] != rows.lookup[:, None])

    def outputs(p, layer):
        x = embed(p, cfg, jnp.asarray(rows.tokens), jnp.float32)
        _, taps = transformer.run_layer_range(p, cfg, x, jnp.asarray(rows.segment_ids), 0, layer + 1, taps=True)
        return np.asarray(taps["mlp_in"][layer] @ p["layers"]["w_down"][layer])[others]

    change = {}
    for keep in (False, True):
        ecfg = EditConfig(prompt="plain", layers=(1, 2), v_steps=25, mom2_update_weight=1.0, stats_tokens=3000,
                          stats_seq_len=256, keep_other_tokens=keep)
        moments = second_moments(params, cfg, tokenizer, tiny4_gemma3, ecfg.layers, ecfg.stats_tokens, ecfg.stats_seq_len)
        edited, _ = apply_memit(params, cfg, tokenizer, requests, ecfg, moments, log=lambda *_: None)
        assert all(efficacy(edited, cfg, tokenizer, requests, "plain"))
        change[keep] = np.linalg.norm(outputs(edited, 2) - outputs(params, 2)) / np.linalg.norm(outputs(params, 2))
    assert change[True] < 0.2 * change[False], change
    zs, _ = memit.target_values(params, cfg, tokenizer, requests, ecfg, (1, 2), True)
    assert zs.shape == (len(requests), 2, cfg.hidden_size)

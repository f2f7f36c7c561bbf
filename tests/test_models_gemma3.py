"""Gemma 3 text models against transformers' Gemma3ForCausalLM on a tiny random checkpoint (three
layers: sliding, sliding, full; window 16, shorter than every prompt here): logits of the forward
(dense and blockwise), of cached decoding, greedy tokens through the decode engine (two sides, one
device and a data x tensor mesh), the decode step's window bound, and a train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixsd_jax.models import transformer
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.tiny import GEMMA3_WINDOW
from mixsd_jax.models.tokenizer import load_tokenizer

TEXTS = (
    "The capital of France is Paris. What profession does the person train? Please reason step by step.",
    "What is the output of F(x)? Based on the input-output examples below, infer the rule.",
    "Which location does the organisation reside in?",
)


def _reference(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _prompts(model_dir):
    tok = load_tokenizer(model_dir)
    prompts = [tok.prompt_ids(t) for t in TEXTS]
    assert max(map(len, prompts)) > GEMMA3_WINDOW + 8
    return tok, prompts


def _padded(seqs):
    width = max(map(len, seqs))
    tokens = np.zeros((len(seqs), width), np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], mask[i, : len(s)] = s, 1
    return tokens, mask


@pytest.mark.parametrize("attention_block", [0, 8])
def test_padded_batch_logits_match_transformers(tiny_gemma3_dir, attention_block):
    cfg, params = load_hf(tiny_gemma3_dir)
    assert cfg.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    rng = np.random.default_rng(0)
    tokens, mask = _padded([list(rng.integers(3, cfg.vocab_size, n)) for n in (45, 30, 12)])
    with torch.no_grad():
        want = _reference(tiny_gemma3_dir)(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
    seg = jnp.asarray(mask, jnp.int32)
    hidden, _ = transformer.forward(params, cfg, jnp.asarray(tokens, jnp.int32), transformer.padded_positions(seg), seg,
                           attention_block=attention_block)
    got = np.asarray(transformer.lm_logits(params, cfg, hidden))
    for i, n in enumerate(mask.sum(1)):
        np.testing.assert_allclose(got[i, :n], want.numpy()[i, :n], atol=1e-4, rtol=1e-3)
    # The window binds: without it the long row's late positions differ.
    unwindowed = cfg.__class__(**{**cfg.__dict__, "layer_types": None, "sliding_window": None})
    hidden, _ = transformer.forward(params, unwindowed, jnp.asarray(tokens, jnp.int32), transformer.padded_positions(seg), seg)
    assert np.abs(np.asarray(transformer.lm_logits(params, unwindowed, hidden))[0, 40] - want.numpy()[0, 40]).max() > 1e-2


def test_cached_decoding_matches_transformers(tiny_gemma3_dir):
    cfg, params = load_hf(tiny_gemma3_dir)
    _, prompts = _prompts(tiny_gemma3_dir)
    ref = _reference(tiny_gemma3_dir)
    steps = 12
    with torch.no_grad():
        seqs = [ref.generate(torch.tensor([p]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0].tolist() for p in prompts]
        tokens, mask = _padded(seqs)
        want = ref(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    ptokens, pmask = _padded(prompts)
    pseg = jnp.asarray(pmask, jnp.int32)
    _, cache = transformer.prefill(params, cfg, jnp.asarray(ptokens, jnp.int32), transformer.padded_positions(pseg), pseg,
                          ptokens.shape[1] + steps)
    step = jax.jit(lambda p, t, pos, c: transformer.forward(p, cfg, t, pos, jnp.ones_like(t), c))
    for k in range(1, steps):
        # Step k feeds generated token k-1 (at position len+k-1); positions pass the window.
        pos = np.array([len(p) + k - 1 for p in prompts])
        fed = np.array([s[i] for s, i in zip(seqs, pos)])
        hidden, cache = step(params, jnp.asarray(fed[:, None], jnp.int32), jnp.asarray(pos[:, None], jnp.int32), cache)
        got = np.asarray(transformer.lm_logits(params, cfg, hidden[:, 0]))
        np.testing.assert_allclose(got, want[np.arange(len(prompts)), pos], atol=1e-4, rtol=1e-3)


def _hf_greedy(model_dir, prompt, n):
    with torch.no_grad():
        out = _reference(model_dir).generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _engine_tokens(params, cfg, expert, naive, lam, mesh=None):
    from mixsd_jax.sampling.engine import Engine, EngineSpec, decode_all
    from mixsd_jax.sampling.strategies import Sampler
    from mixsd_jax.sampling.work import WorkItem

    engine = Engine(params, EngineSpec(cfg, Sampler(0.0), sides=2, max_new_tokens=20, max_model_len=256, batch_size=2,
                                       stop_ids=(), seed=0, naive_prob=lam, segment_steps=6, block=8, mesh=mesh))
    out = decode_all(engine, [WorkItem((tuple(expert), tuple(naive)), 0)])[0]
    return out.tokens, out.naive


def test_engine_lambda_0_and_1_give_transformers_greedy_on_one_device_and_a_tensor_mesh(tiny_gemma3_dir):
    from mixsd_jax.models.sharding import MeshConfig, make_mesh

    cfg, params = load_hf(tiny_gemma3_dir)
    _, (expert, naive, _) = _prompts(tiny_gemma3_dir)
    want = {0.0: _hf_greedy(tiny_gemma3_dir, expert, 20), 1.0: _hf_greedy(tiny_gemma3_dir, naive, 20)}
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    assert jax.device_count() == 8
    _, sharded = load_hf(tiny_gemma3_dir, mesh=mesh)
    for lam in (0.0, 1.0):
        for p, m in ((params, None), (sharded, mesh)):
            tokens, naive_flags = _engine_tokens(p, cfg, expert, naive, lam, m)
            assert tokens == want[lam]
            assert all(flag == (lam == 1.0) for flag in naive_flags)


@pytest.mark.parametrize("one_read", [False, True])
def test_decode_step_never_reads_the_blocks_before_the_window(tiny_gemma3_dir, one_read):
    from mixsd_jax.models.decode import decode_step

    cfg, params = load_hf(tiny_gemma3_dir)
    L, K, E, S, block = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 48, 8
    lengths = jnp.asarray([40, 37], jnp.int32)  # windows start at slots 25 and 22: blocks 0, 1 are never needed
    rng = np.random.default_rng(0)
    cache_k = rng.standard_normal((L, 2, K, S, E)).astype(np.float32)  # one side, two rows
    cache_v = rng.standard_normal((L, 2, K, S, E)).astype(np.float32)

    def step(cache_v):
        hidden, _, _ = decode_step(params, cfg, jnp.asarray([5, 6], jnp.int32), lengths, lengths,
                                   (jnp.asarray(cache_k),), (jnp.asarray(cache_v),), jnp.asarray([40], jnp.int32),
                                   dtype=jnp.float32, block=block, one_read=one_read)
        return np.asarray(hidden)

    clean = step(cache_v)
    # Only the full layer reads slots 0..15; poison them in the sliding layers: NaN read anywhere,
    # even under a zero weight, would make the output NaN.
    sliding = [i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"]
    poisoned = cache_v.copy()
    poisoned[sliding, :, :, :16] = np.nan
    np.testing.assert_array_equal(step(poisoned), clean)
    # The check can fail: slots 16..21 are in a block the walk reads, masked for both rows.
    poisoned[sliding, :, :, 16:22] = np.nan
    assert np.isnan(step(poisoned)).all()


def test_train_step_lowers_the_loss(tiny_gemma3_dir):
    from mixsd_jax.data.records import Record
    from mixsd_jax.models.sharding import MeshConfig, make_mesh
    from mixsd_jax.train import step as step_lib
    from mixsd_jax.data.tokenize import tokenize_records
    from mixsd_jax.train.batches import BatchPlan

    records = [Record(text, answer) for text in TEXTS for answer in ("The answer is 42.", "Paris.")][:4]
    data = tokenize_records(load_tokenizer(tiny_gemma3_dir), records, max_seq_len=64)
    plan = BatchPlan(data.examples, batch_size=4, grad_accum=1, seed=0, max_seq_len=64, packing=False)
    mesh = make_mesh(MeshConfig(data=2, tensor=2, fsdp=2))
    cfg, params = load_hf(tiny_gemma3_dir, mesh=mesh)
    opt = step_lib.OptimConfig(lr=3e-3, total_steps=0, weight_decay=0.0)
    tx = step_lib.make_optimizer(opt)
    state = step_lib.init_state(params, tx, step_lib.state_shardings(cfg, tx, mesh))
    step_fn = step_lib.jit_train_step(cfg, opt, mesh, "float32")
    batch = step_lib.device_batch(plan.host_batch(0), mesh)
    losses = []
    for _ in range(6):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0]


def test_config_reads_v4_fields_and_exports_what_transformers_loads(tiny_gemma3_dir, tmp_path):
    from mixsd_jax.models.checkpoint import export_hf
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.known_shapes import known_model_config

    # transformers v4 / the Hub's config.json: rope_theta + rope_local_base_freq, a pattern, no layer_types.
    v4 = ModelConfig.from_hf_dict({
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 512,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6,
    })
    assert v4 == known_model_config("gemma3-270m").__class__(**{**known_model_config("gemma3-270m").__dict__,
                                                                 "max_position_embeddings": 4096})
    assert [i for i, t in enumerate(v4.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert (v4.rope_theta, v4.local_rope_theta, v4.tie_word_embeddings) == (1e6, 1e4, True)

    cfg, params = load_hf(tiny_gemma3_dir)
    out = export_hf(params, cfg, tmp_path / "export", tokenizer_dir=tiny_gemma3_dir)
    assert ModelConfig.from_hf_dir(out) == cfg
    tokens = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        a = _reference(out)(input_ids=tokens).logits
        b = _reference(tiny_gemma3_dir)(input_ids=tokens).logits
    assert torch.equal(a, b)


def test_known_shapes_give_the_published_parameter_counts():
    """Gemma 3's sizes by their names: 270M (268M with the 262k embedding), 1B, and the text
    towers of 4B, 12B and 27B (3.88B, 11.77B, 27.0B: the checkpoints' totals less the vision tower)."""
    import math

    from mixsd_jax.models.known_shapes import known_model_config

    def billions(name):
        shapes = transformer.param_shapes(known_model_config(name))
        return sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))) / 1e9

    counts = [billions(n) for n in ("google/gemma-3-270m", "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b")]
    np.testing.assert_allclose(counts, [0.268, 1.000, 3.880, 11.766, 27.009], atol=0.002)
    assert known_model_config("gemma3-27b").attention_divisor == math.sqrt(168)

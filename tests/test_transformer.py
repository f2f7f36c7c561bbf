"""Our transformer against transformers' PyTorch models, on tiny random checkpoints of each family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mixsd_jax.models import transformer
from mixsd_jax.models.checkpoint import load_hf

LENGTHS = [12, 7, 3]


def _batch(vocab, lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    tokens = rng.integers(0, vocab, (len(lengths), T))
    mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return tokens, mask


def _hf_logits(model_dir, tokens, mask):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


def _ours(params, cfg, tokens, mask, dtype=jnp.float32):
    seg = jnp.asarray(mask, jnp.int32)
    hidden, _ = transformer.forward(params, cfg, jnp.asarray(tokens), transformer.padded_positions(seg), seg, dtype=dtype)
    return np.asarray(transformer.lm_logits(params, cfg, hidden, dtype=dtype))


def test_padded_batch_matches_transformers(tiny_model_dir):
    cfg, params = load_hf(tiny_model_dir)
    tokens, mask = _batch(cfg.vocab_size)
    ref = _hf_logits(tiny_model_dir, tokens, mask)
    ours = _ours(params, cfg, tokens, mask)
    for row, n in enumerate(LENGTHS):
        np.testing.assert_allclose(ours[row, :n], ref[row, :n], atol=1e-4, rtol=0)


def test_cached_decoding_matches_full_forward(tiny_model_dir):
    """Prefill a right-padded batch of different prompt lengths, then decode one token at a time."""
    cfg, params = load_hf(tiny_model_dir)
    total = 10
    tokens, _ = _batch(cfg.vocab_size, [total] * 3, seed=1)
    full = _ours(params, cfg, tokens, np.ones_like(tokens))
    prompt_lens = np.array([6, 3, 5])
    P = prompt_lens.max()
    seg = (np.arange(P)[None] < prompt_lens[:, None]).astype(np.int32)
    cache = transformer.init_cache(cfg, 3, P + total)
    hidden, cache = transformer.forward(params, cfg, jnp.asarray(tokens[:, :P] * seg), transformer.padded_positions(jnp.asarray(seg)),
                               jnp.asarray(seg), cache)
    prefill_logits = np.asarray(transformer.lm_logits(params, cfg, hidden))
    for row, n in enumerate(prompt_lens):
        np.testing.assert_allclose(prefill_logits[row, :n], full[row, :n], atol=1e-4)
    step = jax.jit(lambda p, t, pos, c: transformer.forward(p, cfg, t, pos, jnp.ones_like(t), c))
    pos = prompt_lens.copy()
    for _ in range(total - P):
        next_tok = tokens[np.arange(3), pos][:, None]
        hidden, cache = step(params, jnp.asarray(next_tok), jnp.asarray(pos[:, None]), cache)
        logits = np.asarray(transformer.lm_logits(params, cfg, hidden))[:, 0]
        np.testing.assert_allclose(logits, full[np.arange(3), pos], atol=1e-4)
        pos += 1


def test_packed_segments_do_not_attend_across_documents(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    a, _ = _batch(cfg.vocab_size, [5], seed=2)
    b, _ = _batch(cfg.vocab_size, [4], seed=3)
    packed = np.concatenate([a, b], axis=1)
    seg = jnp.asarray([[1] * 5 + [2] * 4])
    pos = jnp.asarray([list(range(5)) + list(range(4))])
    hidden, _ = transformer.forward(params, cfg, jnp.asarray(packed), pos, seg)
    logits = np.asarray(transformer.lm_logits(params, cfg, hidden))[0]
    np.testing.assert_allclose(logits[:5], _ours(params, cfg, a, np.ones_like(a))[0], atol=1e-5)
    np.testing.assert_allclose(logits[5:], _ours(params, cfg, b, np.ones_like(b))[0], atol=1e-5)


def test_bf16_compute_is_close_to_f32(tiny_qwen3_dir):
    cfg, params = load_hf(tiny_qwen3_dir)
    tokens, mask = _batch(cfg.vocab_size)
    f32 = _ours(params, cfg, tokens, mask)
    bf16 = _ours(params, cfg, tokens, mask, dtype=jnp.bfloat16)
    assert bf16.dtype == np.float32
    assert np.abs(bf16[0] - f32[0]).max() < 0.1 * np.abs(f32[0]).max()
    assert (bf16[0].argmax(-1) == f32[0].argmax(-1)).mean() > 0.9


def test_llama3_rope_scaling_changes_frequencies(tiny_llama_dir):
    cfg, _ = load_hf(tiny_llama_dir)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3"
    scaled = np.asarray(transformer.rope_inv_freq(cfg))
    plain = np.asarray(transformer.rope_inv_freq(cfg.__class__(**{**cfg.__dict__, "rope_scaling": None})))
    assert scaled[0] == pytest.approx(plain[0])  # high frequencies kept
    assert scaled[-1] == pytest.approx(plain[-1] / cfg.rope_scaling.factor)  # low ones slowed


@pytest.mark.parametrize("name", ["gemma3-270m", "gemma3-4b", "qwen3-4b-instruct-2507", "llama-3.2-3b-instruct"])
def test_rope_frequencies_under_jit_are_transformers_own(name):
    """The RoPE frequencies a jitted forward uses (plain, linear and llama3 scaling, local and
    global layers) are transformers' float32 buffers for the same config.json: a last-bit
    difference moves the angle at position p by p times as much. Transformers' float32 pow is not
    correctly rounded at one entry of some tables, so one entry may differ there, by one ulp."""
    from transformers import AutoConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    from mixsd_jax.models.block import layer_variants
    from mixsd_jax.models.config import SLIDING
    from mixsd_jax.models.known_shapes import HF_CONFIGS, known_model_config

    fields = HF_CONFIGS[name]
    rotary = {"gemma3_text": Gemma3RotaryEmbedding, "llama": LlamaRotaryEmbedding,
              "qwen3": Qwen3RotaryEmbedding}[fields["model_type"]](AutoConfig.for_model(**fields))
    cfg = known_model_config(name)
    if cfg.has_sliding_layers:
        table_LxE2 = np.asarray(jax.jit(lambda: jnp.asarray(layer_variants(cfg)["inv_freq"]))())
        sliding = cfg.layer_types.index(SLIDING)
        full = next(i for i, t in enumerate(cfg.layer_types) if t != SLIDING)
        pairs = [(table_LxE2[sliding], rotary.sliding_attention_inv_freq), (table_LxE2[full], rotary.full_attention_inv_freq)]
    else:
        pairs = [(np.asarray(jax.jit(lambda: jnp.asarray(transformer.rope_inv_freq(cfg)))()), rotary.inv_freq)]
    for ours, theirs in pairs:
        theirs = theirs.numpy()
        assert ours.dtype == theirs.dtype == np.float32
        assert (ours != theirs).sum() <= 1
        np.testing.assert_array_max_ulp(ours, theirs, maxulp=1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_forward_with_taps_matches_transformers_hidden_states_hooks_and_an_mlp_edit(tiny_llama_dir, tiny_gemma3_dir,
                                                                                 family):
    """The taps MEMIT reads (each layer's down-projection input and residual output) and the edit
    it makes (a vector added to one layer's MLP output), against transformers' hidden states and
    forward hooks on the same modules."""
    model_dir = tiny_llama_dir if family == "llama" else tiny_gemma3_dir
    cfg, params = load_hf(model_dir)
    tokens, mask = _batch(cfg.vocab_size, lengths=[20, 9])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = model.model.layers
    down_inputs = []
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, args, out: down_inputs.append(args[0]))
             for layer in layers]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    seg = jnp.asarray(mask, jnp.int32)
    logits, taps = transformer.forward_with_taps(params, cfg, jnp.asarray(tokens), seg)
    real = mask.astype(bool)
    L = cfg.num_layers
    assert taps["mlp_in"].shape == (L, 2, 20, cfg.intermediate_size)
    assert taps["resid_out"].shape == (L, 2, 20, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(logits)[real], ref.logits.numpy()[real], atol=1e-4)
    for layer in range(L):
        np.testing.assert_allclose(np.asarray(taps["mlp_in"][layer])[real], down_inputs[layer].numpy()[real], atol=1e-4)
    # transformers' last hidden state is after the final norm; the others are the layers' outputs.
    for layer in range(L - 1):
        np.testing.assert_allclose(np.asarray(taps["resid_out"][layer])[real],
                                   ref.hidden_states[layer + 1].numpy()[real], atol=1e-4)
    # An edit of layer 1's MLP output, as a forward hook adding the same vector in transformers.
    delta = np.random.default_rng(1).standard_normal((2, 20, cfg.hidden_size)).astype(np.float32)
    hook = layers[1].mlp.register_forward_hook(lambda m, args, out: out + torch.tensor(delta))  # Gemma: before its post-MLP norm
    with torch.no_grad():
        edited_ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    hook.remove()
    edited, _ = transformer.forward_with_taps(params, cfg, jnp.asarray(tokens), seg, mlp_edit=(1, jnp.asarray(delta)))
    np.testing.assert_allclose(np.asarray(edited)[real], edited_ref[real], atol=1e-4)
    assert np.abs(edited_ref[real] - ref.logits.numpy()[real]).max() > 1e-2


def _torch_taps(model_dir, tokens, mask, edit=None):
    """Down-projection inputs and decoder-layer outputs read by PyTorch hooks on transformers' model;
    `edit=(layer, delta_BxTxD)` adds the delta to that layer's MLP output."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    mlp_in, resid_out, handles = [], [], []
    for i, block in enumerate(model.model.layers):
        handles.append(block.mlp.down_proj.register_forward_hook(lambda m, args, out: mlp_in.append(args[0].numpy())))
        handles.append(block.register_forward_hook(
            lambda m, args, out: resid_out.append((out[0] if isinstance(out, tuple) else out).numpy())))
        if edit is not None and i == edit[0]:
            handles.append(block.mlp.register_forward_hook(lambda m, args, out: out + torch.tensor(edit[1])))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    for h in handles:
        h.remove()
    return logits, np.stack(mlp_in), np.stack(resid_out)


def test_forward_with_taps_logits_equal_forward(tiny_model_dir):
    cfg, params = load_hf(tiny_model_dir)
    tokens, mask = _batch(cfg.vocab_size)
    logits, taps = transformer.forward_with_taps(params, cfg, jnp.asarray(tokens), jnp.asarray(mask, jnp.int32))
    ours = _ours(params, cfg, tokens, mask)
    for row, n in enumerate(LENGTHS):
        np.testing.assert_allclose(np.asarray(logits)[row, :n], ours[row, :n], atol=1e-5, rtol=0)
    assert taps["mlp_in"].shape == (cfg.num_layers, 3, max(LENGTHS), cfg.intermediate_size)
    assert taps["resid_out"].shape == (cfg.num_layers, 3, max(LENGTHS), cfg.hidden_size)


def test_the_model_run_in_layer_ranges_equals_the_whole_run(tiny_model_dir):
    """Layers 0..k then k..L from the stored residual stream give the whole model's taps and logits."""
    from mixsd_jax.models.block import embed, norm

    cfg, params = load_hf(tiny_model_dir)
    tokens, mask = _batch(cfg.vocab_size)
    seg = jnp.asarray(mask, jnp.int32)
    logits, taps = transformer.forward_with_taps(params, cfg, jnp.asarray(tokens), seg)
    k = cfg.num_layers // 2
    h, low = transformer.run_layer_range(params, cfg, embed(params, cfg, jnp.asarray(tokens), jnp.float32), seg, 0, k, taps=True)
    out, high = transformer.run_layer_range(params, cfg, h, seg, k, cfg.num_layers, taps=True)
    for name in ("mlp_in", "resid_out"):
        np.testing.assert_allclose(np.concatenate([low[name], high[name]]), taps[name], atol=1e-5, rtol=0)
    pieces = transformer.lm_logits(params, cfg, norm(out, params["final_norm"], cfg))
    np.testing.assert_allclose(np.asarray(pieces)[np.asarray(mask, bool)], np.asarray(logits)[np.asarray(mask, bool)],
                               atol=1e-5, rtol=0)


def test_forward_with_taps_match_transformers_hooks(tiny_model_dir):
    """The taps and the MLP-output edit against hooks on transformers' own modules."""
    cfg, params = load_hf(tiny_model_dir)
    tokens, mask = _batch(cfg.vocab_size)
    delta = np.zeros((3, max(LENGTHS), cfg.hidden_size), np.float32)
    delta[0, 4] = np.random.default_rng(3).normal(size=cfg.hidden_size)
    edit_layer = 0  # so the later layers carry it to the positions after it
    for edit in (None, (edit_layer, delta)):
        ref_logits, ref_in, ref_out = _torch_taps(tiny_model_dir, tokens, mask, edit)
        mlp_edit = None if edit is None else (edit_layer, jnp.asarray(delta))
        logits, taps = transformer.forward_with_taps(params, cfg, jnp.asarray(tokens), jnp.asarray(mask, jnp.int32),
                                            mlp_edit=mlp_edit)
        for row, n in enumerate(LENGTHS):
            np.testing.assert_allclose(np.asarray(logits)[row, :n], ref_logits[row, :n], atol=1e-4, rtol=0)
            np.testing.assert_allclose(np.asarray(taps["mlp_in"])[:, row, :n], ref_in[:, row, :n], atol=1e-5, rtol=0)
            np.testing.assert_allclose(np.asarray(taps["resid_out"])[:, row, :n], ref_out[:, row, :n], atol=1e-4, rtol=0)
    # The edit moved the edited row's last block output from its position on, and nothing else.
    _, plain = transformer.forward_with_taps(params, cfg, jnp.asarray(tokens), jnp.asarray(mask, jnp.int32))
    moved = np.abs(np.asarray(taps["resid_out"] - plain["resid_out"])[-1]).max(axis=-1) > 1e-6
    assert moved[0, 4:LENGTHS[0]].all() and not moved[0, :4].any() and not moved[1:].any()


def test_forward_with_taps_restarts_positions_per_segment(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    tokens, _ = _batch(cfg.vocab_size, [9], seed=5)
    packed_seg = jnp.asarray([[1] * 5 + [2] * 4], jnp.int32)
    packed, _ = transformer.forward_with_taps(params, cfg, jnp.asarray(tokens), packed_seg)
    first, _ = transformer.forward_with_taps(params, cfg, jnp.asarray(tokens[:, :5]), jnp.ones((1, 5), jnp.int32))
    second, _ = transformer.forward_with_taps(params, cfg, jnp.asarray(tokens[:, 5:]), jnp.ones((1, 4), jnp.int32))
    np.testing.assert_allclose(np.asarray(packed), np.concatenate([first, second], axis=1), atol=1e-5)


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_gemma3_dir"])
def test_extend_gives_the_whole_rows_prefill_in_f32_and_in_bf16_around_f32_activations(model, request):
    """`extend` continues rows from a prefix's cache (the engine's shared-prefix prefill); in bf16
    matmuls around f32 activations (the CPU engine) it takes its own attention path."""
    cfg, params = load_hf(request.getfixturevalue(model))
    lengths, prefix_lens = np.array([30, 22, 9]), np.array([20, 4, 8])  # past the tiny Gemma 3's window
    tokens, mask = _batch(cfg.vocab_size, list(lengths), seed=2)
    T, C = tokens.shape[1], prefix_lens.max()
    rest = np.zeros((3, T), np.int64)
    for row, (n, c) in enumerate(zip(lengths, prefix_lens)):
        rest[row, : n - c] = tokens[row, c:n]
    prefix_seg = (np.arange(C)[None] < prefix_lens[:, None]).astype(np.int32)
    rest_seg = (np.arange(T)[None] < (lengths - prefix_lens)[:, None]).astype(np.int32)
    whole_seg = jnp.asarray(mask, jnp.int32)
    for dtype, activations, atol in ((jnp.float32, None, 1e-5), (jnp.bfloat16, jnp.float32, 1e-2)):
        whole, _ = transformer.prefill(params, cfg, jnp.asarray(tokens), transformer.padded_positions(whole_seg),
                                       whole_seg, T, dtype=dtype, activation_dtype=activations)
        _, cache = transformer.prefill(params, cfg, jnp.asarray(tokens[:, :C] * prefix_seg),
                                       transformer.padded_positions(jnp.asarray(prefix_seg)), jnp.asarray(prefix_seg),
                                       C, dtype=dtype, activation_dtype=activations)
        hidden, _, _ = transformer.extend(params, cfg, cache["k"], cache["v"], jnp.asarray(prefix_lens),
                                          jnp.asarray(rest), jnp.asarray(rest_seg), dtype=dtype,
                                          activation_dtype=activations)
        assert hidden.dtype == (activations or dtype)
        for row, (n, c) in enumerate(zip(lengths, prefix_lens)):
            np.testing.assert_allclose(np.asarray(hidden[row, : n - c], np.float32),
                                       np.asarray(whole[row, c:n], np.float32), atol=atol, rtol=0)

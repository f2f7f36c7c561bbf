"""The compiled decode/mixing kernel against transformers and against its own definition."""

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.sharding import MeshConfig, make_mesh
from mixsd_jax.sampling.runner import Runner, WorkItem, generate
from mixsd_jax.sampling.strategies import Sampler

PROMPTS = [(5, 6, 7, 8, 9), (10, 11), (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13), (40,), (7, 7, 7, 7)]


def _runner(params, cfg, *, sides, batch_size, naive_prob=0.0, temperature=0.0, max_new_tokens=12, mesh=None, stop_ids=()):
    return Runner(params, cfg, sampler=Sampler(temperature, 16), sides=sides, stop_ids=stop_ids,
                  max_new_tokens=max_new_tokens, max_model_len=4096, batch_size=batch_size, seed=7, mesh=mesh,
                  naive_prob=naive_prob)


def test_greedy_decode_equals_transformers_generate(tiny_model_dir):
    cfg, params = load_hf(tiny_model_dir)
    ours = generate(params, cfg, PROMPTS, stop_ids=[], max_new_tokens=32, batch_size=4)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for prompt, completion in zip(PROMPTS, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
        assert completion.tokens == ref[0, len(prompt):].tolist()
        assert completion.finish_reason == "max_new_tokens"
        # Per-token log-probabilities are the model's own.
        with torch.no_grad():
            logits = hf(ref).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        expected = logits[torch.arange(32), ref[0, len(prompt):]].numpy()
        np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4)


def test_stop_token_and_length_limits(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    free = generate(params, cfg, [PROMPTS[0]], stop_ids=[], max_new_tokens=10)[0]
    stop = free.tokens[3]
    first = free.tokens.index(stop)
    stopped = generate(params, cfg, [PROMPTS[0]], stop_ids=[stop], max_new_tokens=10)[0]
    assert stopped.tokens == free.tokens[: first + 1] and stopped.finish_reason == "stop"
    # max_model_len counts the prompt: 5 prompt tokens + n generated + 1 > 9  =>  stops after 4.
    capped = generate(params, cfg, [PROMPTS[0]], stop_ids=[], max_new_tokens=10, max_model_len=9)[0]
    assert capped.tokens == free.tokens[:4] and capped.finish_reason == "max_model_len"


def test_padding_slots_start_finished_so_the_loop_ends_with_the_real_records(tiny_llama_dir):
    import jax.numpy as jnp

    from mixsd_jax.sampling import kernel

    cfg, params = load_hf(tiny_llama_dir)
    runner = _runner(params, cfg, sides=1, batch_size=2, max_new_tokens=6)
    tokens = np.array([[5, 6, 7, 8], [5, 6, 7, 8]], np.int32)
    prompts = ((tokens, np.array([4, 4], np.int32)),)
    keys = kernel.record_keys(7, jnp.arange(2, dtype=jnp.uint32), jnp.zeros(2, jnp.uint32), jnp.zeros(2, jnp.uint32))
    out = kernel.decode(params, prompts, keys, np.array([True, False]), runner.naive_prob, runner.stop_ids,
                        spec=runner.spec)
    assert out["lengths"].tolist() == [6, 0] and not out["tokens"][1].any()


def test_lambda_0_is_expert_greedy_and_lambda_1_is_naive_greedy(tiny_qwen3_dir):
    cfg, params = load_hf(tiny_qwen3_dir)
    expert, naive = PROMPTS[2], PROMPTS[0]
    expert_greedy = generate(params, cfg, [expert], stop_ids=[], max_new_tokens=12)[0].tokens
    naive_greedy = generate(params, cfg, [naive], stop_ids=[], max_new_tokens=12)[0].tokens
    for lam, want, naive_flags in [(0.0, expert_greedy, False), (1.0, naive_greedy, True)]:
        out = _runner(params, cfg, sides=2, batch_size=2, naive_prob=lam).run([WorkItem((expert, naive), 0)])[0]
        assert out.tokens == want
        assert all(flag == naive_flags for flag in out.naive)


def test_naive_fraction_is_lambda_within_binomial_error(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    lam, records, steps = 0.3, 32, 24
    runner = _runner(params, cfg, sides=2, batch_size=records, naive_prob=lam, temperature=1.0, max_new_tokens=steps)
    outs = runner.run([WorkItem((PROMPTS[i % 5], PROMPTS[(i + 1) % 5]), i) for i in range(records)])
    picks = np.concatenate([o.naive for o in outs])
    assert len(picks) == records * steps
    sigma = np.sqrt(lam * (1 - lam) / len(picks))
    assert abs(picks.mean() - lam) < 4 * sigma


def _mixed(params, cfg, batch_size, mesh=None):
    runner = _runner(params, cfg, sides=2, batch_size=batch_size, naive_prob=0.5, temperature=1.0, mesh=mesh)
    items = [WorkItem((PROMPTS[i % 5], PROMPTS[(i + 2) % 5]), record_index=i, attempt=i % 2) for i in range(8)]
    outs = []
    for start in range(0, len(items), runner.batch_size):
        outs += runner.run(items[start : start + runner.batch_size])
    return [(o.tokens, o.naive, o.finish_reason) for o in outs]


def test_output_independent_of_batch_size_and_device_count(tiny_qwen2_dir):
    cfg, params = load_hf(tiny_qwen2_dir)
    reference = _mixed(params, cfg, 8)
    assert _mixed(params, cfg, 1) == reference
    assert _mixed(params, cfg, 3) == reference
    mesh = make_mesh(MeshConfig(data=8))
    _, sharded = load_hf(tiny_qwen2_dir, mesh=mesh)
    assert jax.device_count() == 8
    assert _mixed(sharded, cfg, 8, mesh=mesh) == reference
    # Different attempts of the same record draw differently (retries are not replays at T>0).
    items = [WorkItem((PROMPTS[0], PROMPTS[1]), 0, attempt=a) for a in (0, 1)]
    a0, a1 = _runner(params, cfg, sides=2, batch_size=2, naive_prob=0.5, temperature=1.0).run(items)
    assert a0.tokens != a1.tokens


def test_sampler_rejects_bad_settings():
    from mixsd_jax.errors import MixsdError

    with pytest.raises(MixsdError, match="temperature"):
        Sampler(-0.1)
    with pytest.raises(MixsdError, match="topk"):
        Sampler(1.0, 0)


def test_sampler_draws_follow_top_k_softmax_and_ignore_rank_swaps():
    """Tempered top-k draws match softmax(logits / T) over the k largest; a round-off that swaps two
    near-tied logits' ranks (another batch shape) leaves the draws unchanged (noise is per id)."""
    import jax.numpy as jnp

    logits = jnp.array([2.0, 1.0, 1.0 + 1e-7, 0.5, -1.0, -3.0], jnp.float32)
    keys = jax.random.split(jax.random.key(0), 20000)
    sampler = Sampler(0.7, 4)
    draw = jax.jit(lambda lg: sampler.next_tokens(jnp.broadcast_to(lg, (keys.shape[0], 6)), keys)[0])
    tokens = np.asarray(draw(logits))
    want = np.asarray(jax.nn.softmax(logits[:4] / 0.7))
    got = np.bincount(tokens, minlength=6) / len(tokens)
    assert got[4:].sum() == 0  # outside the top 4: never drawn
    np.testing.assert_allclose(got[:4], want, atol=0.015)
    swapped = logits.at[1].set(1.0 + 2e-7)  # ids 1 and 2 trade ranks
    assert np.mean(np.asarray(draw(swapped)) == tokens) > 0.999

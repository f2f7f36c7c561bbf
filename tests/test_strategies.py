"""Next-token strategies: bad settings rejected; tempered top-k draws follow softmax over the top k."""

import jax
import numpy as np
import pytest

from mixsd_jax.sampling.strategies import Sampler


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

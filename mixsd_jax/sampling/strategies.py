"""Next-token strategies: greedy (T=0) and tempered top-k (T>0), one key per row.

Top-k follows the reference: keep the k largest logits, softmax(logits / T) over them, draw one.
The draw is Gumbel-max with one noise value per *vocabulary id* (argmax of logits / T + g[id] over
the kept ids), not per rank in the sorted top-k: two logits that differ only by float round-off
(another batch shape, another device count) may swap ranks, and with rank-indexed noise that swap
would hand them each other's noise and change the sample. With id-indexed noise a round-off can
change the sample only when two perturbed values tie to within it (~1e-6 odds per token).
Returned log-probabilities are the model's own (full-vocabulary softmax at T=1), which is what the
NLL analyses and the record's per-token scores need.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mixsd_jax.errors import MixsdError


@dataclasses.dataclass(frozen=True)
class Sampler:
    temperature: float = 0.0
    topk: int = 64

    def __post_init__(self):
        if not self.temperature >= 0:
            raise MixsdError(f"temperature must be >= 0, got {self.temperature}")
        if self.topk < 1:
            raise MixsdError(f"topk must be >= 1, got {self.topk}")

    def next_tokens(self, logits_BxV: jax.Array, keys_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(tokens [B] int32, model log-probability of each token [B] f32)."""
        logits_BxV = logits_BxV.astype(jnp.float32)
        if self.temperature == 0:
            tokens_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        else:
            B, V = logits_BxV.shape
            scores_BxV = logits_BxV / self.temperature
            if self.topk < V:
                _, top_ids_BxK = jax.lax.top_k(logits_BxV, self.topk)
                kept_BxV = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], top_ids_BxK].set(True)
                scores_BxV = jnp.where(kept_BxV, scores_BxV, -jnp.inf)
            gumbel_BxV = jax.vmap(lambda key: jax.random.gumbel(key, (V,), jnp.float32))(keys_B)
            tokens_B = jnp.argmax(scores_BxV + gumbel_BxV, axis=-1).astype(jnp.int32)
        logprobs_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), tokens_B[:, None], axis=-1)[:, 0]
        return tokens_B, logprobs_B

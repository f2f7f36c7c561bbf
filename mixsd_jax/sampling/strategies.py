"""Next-token strategies: greedy (T=0) and tempered top-k (T>0), one key per row.

Top-k follows the reference: keep the k largest logits, softmax(logits / T) over them, draw one.
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
            k = min(self.topk, logits_BxV.shape[-1])
            top_vals_BxK, top_ids_BxK = jax.lax.top_k(logits_BxV, k)
            choice_B = jax.vmap(jax.random.categorical)(keys_B, top_vals_BxK / self.temperature)
            tokens_B = jnp.take_along_axis(top_ids_BxK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
        logprobs_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), tokens_B[:, None], axis=-1)[:, 0]
        return tokens_B, logprobs_B

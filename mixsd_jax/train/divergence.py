"""Token-level teacher–student divergences over the teacher's top-k tokens (OPSD's loss).

As the reference's NeMo-RL `DistillationLossFn` with `zero_outside_topk: false` (docs/reference.md,
OPSD): at every position take the teacher's k most probable tokens, renormalise *both* the
teacher's and the student's logits over that set (log-softmax of the k gathered logits), then

  forward  = Σ_k p_T (log p_T − log p_S)
  reverse  = Σ_k p_S (log p_S − log p_T)
  mixed    = w · forward + (1 − w) · reverse

The loss is the masked token mean over the response tokens of the whole global batch; the step
sums divergences and mask counts first and divides once (as the SFT NLL).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixsd_jax.errors import MixsdError

DIVERGENCES = ("forward", "reverse", "mixed")


def check_divergence(name: str) -> str:
    if name not in DIVERGENCES:
        raise MixsdError(f"config key 'opsd.divergence': unknown divergence {name!r} (known: {', '.join(DIVERGENCES)})")
    return name


def topk_divergence(student_logits_xV, teacher_logits_xV, *, kind: str, k: int = 64, mixed_weight: float = 0.5):
    """Per-position divergence [...] between two logit tensors [..., V]; the teacher is constant."""
    check_divergence(kind)
    teacher_logits_xV = jax.lax.stop_gradient(teacher_logits_xV.astype(jnp.float32))
    k = min(k, teacher_logits_xV.shape[-1])
    top_teacher_xK, top_ids_xK = jax.lax.top_k(teacher_logits_xV, k)
    top_student_xK = jnp.take_along_axis(student_logits_xV.astype(jnp.float32), top_ids_xK, axis=-1)
    log_t = jax.nn.log_softmax(top_teacher_xK, axis=-1)
    log_s = jax.nn.log_softmax(top_student_xK, axis=-1)
    forward = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    reverse = jnp.sum(jnp.exp(log_s) * (log_s - log_t), axis=-1)
    if kind == "forward":
        return forward
    if kind == "reverse":
        return reverse
    return mixed_weight * forward + (1.0 - mixed_weight) * reverse


def masked_mean(values, mask):
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)

"""OPSD's divergences against an independent PyTorch computation of NeMo-RL's top-k formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixsd_jax.errors import MixsdError
from mixsd_jax.train.divergence import masked_mean, topk_divergence


def _torch_reference(student, teacher, mask, kind, k, w):
    """Top-k of the teacher, both renormalised over it, masked token mean (zero_outside_topk off)."""
    s, t = torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64)
    top_t, idx = torch.topk(t, k, dim=-1)
    top_s = torch.gather(s, -1, idx)
    lt, ls = torch.log_softmax(top_t, -1), torch.log_softmax(top_s, -1)
    fwd = (lt.exp() * (lt - ls)).sum(-1)
    rev = (ls.exp() * (ls - lt)).sum(-1)
    per = {"forward": fwd, "reverse": rev, "mixed": w * fwd + (1 - w) * rev}[kind]
    m = torch.tensor(mask, dtype=torch.float64)
    return float((per * m).sum() / m.sum())


@pytest.mark.parametrize("kind", ["forward", "reverse", "mixed"])
@pytest.mark.parametrize("k", [64, 5])
def test_matches_pytorch_on_random_logits(kind, k):
    rng = np.random.default_rng(0)
    student = rng.normal(0, 3, (3, 7, 300)).astype(np.float32)
    teacher = rng.normal(0, 3, (3, 7, 300)).astype(np.float32)
    mask = (rng.random((3, 7)) < 0.6).astype(np.float32)
    mask[0, 0] = 1
    ours = float(masked_mean(topk_divergence(jnp.asarray(student), jnp.asarray(teacher), kind=kind, k=k,
                                             mixed_weight=0.3), jnp.asarray(mask)))
    ref = _torch_reference(student, teacher, mask, kind, k, 0.3)
    assert ours == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert ref > 0


def test_gradient_matches_pytorch_and_teacher_is_constant():
    rng = np.random.default_rng(1)
    student = rng.normal(0, 2, (4, 50)).astype(np.float32)
    teacher = rng.normal(0, 2, (4, 50)).astype(np.float32)
    mask = np.array([1, 0, 1, 1], np.float32)

    def loss(s, t):
        return masked_mean(topk_divergence(s, t, kind="mixed", k=8, mixed_weight=0.5), jnp.asarray(mask))

    g_s, g_t = jax.grad(loss, argnums=(0, 1))(jnp.asarray(student), jnp.asarray(teacher))
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(teacher, dtype=torch.float64)
    top_t, idx = torch.topk(t, 8, dim=-1)
    lt, ls = torch.log_softmax(top_t, -1), torch.log_softmax(torch.gather(s, -1, idx), -1)
    per = 0.5 * (lt.exp() * (lt - ls)).sum(-1) + 0.5 * (ls.exp() * (ls - lt)).sum(-1)
    m = torch.tensor(mask, dtype=torch.float64)
    ((per * m).sum() / m.sum()).backward()
    np.testing.assert_allclose(np.asarray(g_s), s.grad.numpy(), atol=1e-6)
    assert not np.any(np.asarray(g_t))


def test_zero_when_student_equals_teacher_and_unknown_kind_rejected():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 40)), jnp.float32)
    assert float(jnp.max(jnp.abs(topk_divergence(x, x, kind="forward")))) < 1e-6
    with pytest.raises(MixsdError, match="unknown divergence 'jsd'"):
        topk_divergence(x, x, kind="jsd")

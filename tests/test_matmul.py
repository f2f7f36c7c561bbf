"""models.matmul: the weight matmul's hand-written backward pass (used for bf16 compute) equals
autodiff of the plain matmul, keeps the master weight's gradient in f32, and on XLA:CPU runs every
bf16 matmul of the backward pass on bf16 operands (the fast library path)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixsd_jax.models.matmul import _weight_matmul, weight_matmul


def _operands(x_shape, w_shape, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, x_shape, jnp.float32), jax.random.normal(kw, w_shape, jnp.float32)


@pytest.mark.parametrize("w_out_in", [False, True])
def test_the_written_backward_pass_equals_autodiff_of_the_plain_matmul(w_out_in):
    """Checked in f32, where the two differ only by round-off (f32 compute itself keeps
    autodiff's backward pass)."""
    x, w = _operands((12, 5), (7, 5) if w_out_in else (5, 7))
    cot = jax.random.normal(jax.random.key(1), (12, 7))

    def ours(x, w):
        return jnp.sum(_weight_matmul(x, w, jnp.dtype(jnp.float32), jnp.dtype(jnp.float32), w_out_in) * cot)

    def plain(x, w):
        return jnp.sum((x @ (w.T if w_out_in else w)) * cot)

    np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-6)
    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w_out_in", [False, True])
def test_bf16_compute_returns_f32_master_gradients_close_to_f32(w_out_in):
    x, w = _operands((64, 32), (48, 32) if w_out_in else (32, 48))

    def loss(x, w, dtype):
        return jnp.sum(weight_matmul(x, w, dtype, jnp.float32, w_out_in=w_out_in) ** 2)

    gx16, gw16 = jax.grad(loss, (0, 1))(x, w, jnp.bfloat16)
    gx32, gw32 = jax.grad(loss, (0, 1))(x, w, jnp.float32)
    assert gw16.dtype == jnp.float32 and gx16.dtype == jnp.float32
    for a, b in ((gx16, gx32), (gw16, gw32)):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-2


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
    """Element types of both operands of every dot in compiled HLO text."""
    types = []
    for computation in re.split(r"\n(?=\S)", hlo):
        defined = dict(re.findall(r"%(\S+) = (\w+)\[", computation))
        for a, b in re.findall(r"\bdot\(%([^,\s]+), %([^)\s]+)\)", computation):
            types.append((defined.get(a, "?"), defined.get(b, "?")))
    return types


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's matmul paths")
@pytest.mark.parametrize("w_out_in", [False, True])
def test_bf16_backward_matmuls_take_bf16_operands_on_cpu(w_out_in):
    """The forward matmul and both gradient matmuls: bf16 x bf16 (-> f32). Autodiff of a plain
    bf16 matmul has XLA convert its gradient matmuls' operands to f32 (the slow path)."""
    x = jnp.ones((256, 64), jnp.bfloat16)
    w = jnp.ones((96, 64) if w_out_in else (64, 96), jnp.float32)

    def ours(x, w):
        return jnp.sum(weight_matmul(x, w, jnp.bfloat16, jnp.float32, w_out_in=w_out_in))

    def plain(x, w):
        wc = w.astype(jnp.bfloat16)
        return jnp.sum(jnp.dot(x, wc.T if w_out_in else wc).astype(jnp.float32))

    ours_types = _dot_operand_types(jax.jit(jax.value_and_grad(ours, (0, 1))).lower(x, w).compile().as_text())
    plain_types = _dot_operand_types(jax.jit(jax.value_and_grad(plain, (0, 1))).lower(x, w).compile().as_text())
    assert len(ours_types) == 3 and set(ours_types) == {("bf16", "bf16")}
    assert ("f32", "f32") in plain_types

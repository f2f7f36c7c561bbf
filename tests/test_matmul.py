"""models.matmul: the weight and batched matmuls' hand-written backward passes (used for bf16
compute) equal autodiff of the plain matmul and finite differences, keep gradients in the inputs'
dtype, and on XLA:CPU run every bf16 matmul of the backward pass on bf16 operands (the fast library
path), the attention's too; `past_slow_rows` pads only 61-64 rows, keeping every row's bits."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixsd_jax.models.attention import attention, sequence_mask
from mixsd_jax.models.matmul import _weight_matmul, batch_matmul, past_slow_rows, weight_matmul


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


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's matmul paths")
@pytest.mark.parametrize("rows", [60, 61, 64, 66])
def test_bf16_matmuls_of_61_to_64_rows_run_on_65_on_cpu_with_the_same_results(rows):
    """past_slow_rows: only 61-64 rows are padded, and the padded matmul gives every row the very
    bits of the plain bf16 matmul, forward and in the input gradient."""
    x, w = _operands((rows, 96), (96, 48))
    cot = jax.random.normal(jax.random.key(1), (rows, 48))
    forward = jax.jit(lambda x, w: past_slow_rows(lambda a: weight_matmul(a, w, jnp.bfloat16, jnp.float32), x,
                                                  jnp.bfloat16))
    plain_forward = jax.jit(lambda x, w: jax.lax.dot_general(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32))
    np.testing.assert_array_equal(forward(x, w), plain_forward(x, w))
    # The input gradient g w^T has the same rows, padded too: its first 32 rows are those of 32 rows
    # alone (never padded).
    dx = jax.jit(jax.grad(lambda x, cot: jnp.sum(forward(x, w) * cot)))
    np.testing.assert_array_equal(dx(x, cot)[:32], dx(x[:32], cot[:32]))
    assert ("bf16[65," in forward.lower(x, w).compile().as_text()) == (61 <= rows <= 64)


@pytest.mark.parametrize("b_nk", [False, True])
def test_batch_matmul_backward_equals_autodiff_of_the_einsum(b_nk):
    """In f32, where the written backward pass and autodiff differ only by round-off."""
    ka, kb, kc = jax.random.split(jax.random.key(2), 3)
    a = jax.random.normal(ka, (3, 12, 5))
    b = jax.random.normal(kb, (3, 7, 5) if b_nk else (3, 5, 7))
    cot = jax.random.normal(kc, (3, 12, 7))
    spec = "bmk,bnk->bmn" if b_nk else "bmk,bkn->bmn"

    def ours(a, b):
        return jnp.sum(batch_matmul(a, b, jnp.float32, jnp.float32, b_nk=b_nk) * cot)

    def plain(a, b):
        return jnp.sum(jnp.einsum(spec, a, b) * cot)

    np.testing.assert_allclose(ours(a, b), plain(a, b), rtol=1e-6)
    for x, y in zip(jax.grad(ours, (0, 1))(a, b), jax.grad(plain, (0, 1))(a, b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_batch_matmul_gradients_by_finite_differences():
    """bf16 operands, f32 inputs: the gradients (returned in f32) match central differences of the
    f32 product to bf16 round-off."""
    a = jax.random.normal(jax.random.key(3), (2, 4, 3))
    b = jax.random.normal(jax.random.key(4), (2, 5, 3))

    def loss(a, b, dtype):
        return jnp.sum(jnp.sin(batch_matmul(a, b, dtype, jnp.float32, b_nk=True)))

    ga, gb = jax.grad(loss, (0, 1))(a, b, jnp.bfloat16)
    assert ga.dtype == gb.dtype == jnp.float32
    eps = 1e-2
    for grad, arg in ((ga, 0), (gb, 1)):
        x = (a, b)[arg]
        for index in [(0, 0, 0), (1, 2, 1), (1, 3, 2)] if arg == 0 else [(0, 4, 0), (1, 1, 2)]:
            bump = jnp.zeros_like(x).at[index].set(eps)
            hi, lo = ((x + bump, b) if arg == 0 else (a, x + bump)), ((x - bump, b) if arg == 0 else (a, x - bump))
            numeric = (loss(*hi, jnp.float32) - loss(*lo, jnp.float32)) / (2 * eps)
            assert abs(float(grad[index]) - float(numeric)) < 0.05 * max(1.0, abs(float(numeric)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's matmul paths")
def test_low_precision_attention_runs_every_matmul_on_bf16_operands_on_cpu():
    """QK^T and PV forward and their four gradient matmuls: bf16 x bf16 on XLA:CPU. The einsum
    attention with bf16 operands leaves f32 x f32 matmuls in the backward pass."""
    B, T, H, K, E = 2, 32, 6, 2, 16
    q = jnp.ones((B, T, H, E), jnp.float32)
    kv = jnp.ones((B, T, K, E), jnp.float32)
    mask = sequence_mask(jnp.ones((B, T), jnp.int32))

    def ours(q, k, v):
        return jnp.sum(attention(q, k, v, mask, None, jnp.bfloat16))

    def plain(q, k, v):
        return jnp.sum(attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask)
                       .astype(jnp.float32))

    ours_types = _dot_operand_types(jax.jit(jax.value_and_grad(ours, (0, 1, 2))).lower(q, kv, kv).compile().as_text())
    plain_types = _dot_operand_types(jax.jit(jax.value_and_grad(plain, (0, 1, 2))).lower(q, kv, kv).compile().as_text())
    assert len(ours_types) == 6 and set(ours_types) == {("bf16", "bf16")}
    assert ("f32", "f32") in plain_types


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's handling of bf16 stacks")
def test_bf16_residuals_stack_in_a_layer_scan_without_f32_copies_of_the_stack():
    """Scanned over layers, the bf16 operands the backward pass keeps are stacked [L, N, I]; kept
    as bf16, XLA:CPU converted the whole stack to f32 and back at every layer."""
    L, N, I, O = 4, 64, 32, 48
    x = jnp.ones((N, I), jnp.float32)
    ws = jnp.ones((L, I, O), jnp.float32) / I

    def loss(x, ws):
        def layer(h, w):
            return weight_matmul(h, w, jnp.bfloat16, jnp.float32)[:, :I], None
        return jnp.sum(jax.lax.scan(layer, x, ws)[0])

    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, ws).compile().as_text()
    assert f"u16[{L},{N},{I}]" in hlo  # the stacked residual
    assert f"f32[{L},{N},{I}]" not in hlo and f"bf16[{L},{N},{I}]" not in hlo

"""The weight matmul of every projection and of the LM head, with a backward pass written out.

`weight_matmul(x_NxI, w, dtype)` multiplies activations [N, I] by a weight stored [I, O] (or
[O, I] with `w_out_in`, the tied LM head) in the compute `dtype`, accumulating in f32. The weight
is the f32 master copy: it is cast to `dtype` inside, and its gradient comes back in the master's
dtype straight from an f32-accumulated matmul (never rounded through `dtype`).

Why the backward pass is written by hand: XLA:CPU runs a matmul on its fast library path
(YNNPACK, which uses AMX / AVX512-BF16 for bf16) only when both operands are row-major and the
left one is contracted over its last dimension, and it runs a bf16 matmul in bf16 only when the
result is f32. Autodiff of `jnp.dot` gives neither: the weight gradient x^T g contracts both
operands over their first dimension, and every gradient matmul returns `dtype`. XLA then converts
the operands to f32 and runs its generic matmul, 5-15x slower than the library's bf16 kernel on
an AMX CPU. Here every matmul, forward and backward, has the form the library takes: bf16 x bf16
-> f32, and the transposed activations of the weight gradient are materialised first (a copy of
[I, N], small next to the matmul). On other backends the transpose is left to the compiler. f32
compute keeps the plain matmul and autodiff's backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _mm(a_NxK, b, b_contract: int):
    """a [N, K] times b contracted over its dimension `b_contract` ([K, M] at 0, [M, K] at 1), f32."""
    return jax.lax.dot_general(a_NxK, b, (((1,), (b_contract,)), ((), ())), preferred_element_type=jnp.float32)


def _cpu_transposed(a_NxK):
    # The barrier keeps XLA from folding the transpose back into the matmul as a contraction over
    # dimension 0 (which leaves the library path); through the [K, 1, N] reshape the barrier's
    # value is a row-major array, which the library takes as it is.
    N, K = a_NxK.shape
    return jax.lax.optimization_barrier(a_NxK.T.reshape(K, 1, N)).reshape(K, N)


def transposed(a_NxK):
    """a^T [K, N], as a row-major copy on CPU (see the module doc); a plain transpose elsewhere."""
    return jax.lax.platform_dependent(a_NxK, cpu=_cpu_transposed, default=lambda a: a.T)


def _transposed_result(product_KxM):
    # On CPU the barrier keeps XLA from folding the transpose into the matmul that produced
    # `product` (a matmul with a transposed result has no library kernel).
    return jax.lax.platform_dependent(product_KxM, cpu=lambda p: jax.lax.optimization_barrier(p).T,
                                      default=lambda p: p.T)


# XLA:CPU's library matmul (YNNPACK, jaxlib 0.10.2) has a cliff at 61-64 rows in bf16. On an AMD
# EPYC with AVX512-BF16, with a contraction of 1536 or more, such a matmul took as long as one of
# 128 rows: a decoder layer's down projection, [64, 1536] x [1536, 576], 0.48 ms against 0.28 at 60,
# 65 or 72 rows; [64, 8192] x [8192, 2048] 8.6 ms against 5.5-6.0 at 65 (docs/benchmarks.md).
# 576-wide contractions showed no cliff and lost nothing padded. A MixSD decode step of 32 records
# has 64 rows. Only the layers' projections are padded (block.linear): the LM head's logits and
# sampling, timed whole at 64 and at 65 rows, took the same time.
_CPU_SLOW_BF16_ROWS = range(61, 65)
_CPU_PADDED_ROWS = 65


def past_slow_rows(matmul, x_NxI, dtype):
    """`matmul(x_NxI)` [N, O], with x's rows padded to 65 on XLA:CPU when the matmul is bf16 and N is
    61-64 (the cliff above): the extra rows are zeros and cut off, and every row's result is bit for
    bit the same (a matmul's rows do not mix). Unchanged on other backends and row counts."""
    N = x_NxI.shape[0]
    if jnp.dtype(dtype) != jnp.bfloat16 or N not in _CPU_SLOW_BF16_ROWS:
        return matmul(x_NxI)
    padded = lambda a: matmul(jnp.pad(a, ((0, _CPU_PADDED_ROWS - N), (0, 0))))[:N]  # noqa: E731
    return jax.lax.platform_dependent(x_NxI, cpu=padded, default=matmul)


def to_bits(a):
    """A bf16 array as its 16-bit patterns (uint16; other dtypes unchanged), for in-place updates.

    XLA:CPU has no bf16 kernel for dynamic-update-slice or scatter: it converts the whole target
    to f32 and back around every update. Inside the layer scan the backward pass's residuals are
    stacked that way per layer (quadratic in depth; a quarter of the bf16 step's time on the
    embedded model). A uint16 target is updated in place. A bitcast costs nothing on any backend."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a


def to_words(a):
    """A bf16 array as uint32 words, each the bit patterns of two neighbours along the last
    dimension ([..., N] -> [..., N / 2]; `to_bits` when N is odd; other dtypes unchanged), for
    XLA:CPU: in place where a bf16 array is converted whole around every update (`to_bits`), and
    half the elements where a bf16 or uint16 slice is copied element by element (a layer's weights
    out of the layer scan's stack, the decode step's reads of its caches): such a copy took 30%
    less time alone, though a whole decode step's change stayed within a 2-core machine's noise
    (docs/benchmarks.md). A bitcast and a reshape of the minor dimension cost nothing on a CPU (on
    a TPU the reshape is a relayout: the TPU programs do not use words)."""
    if a.dtype != jnp.bfloat16 or a.ndim == 0 or a.shape[-1] % 2:
        return to_bits(a)
    return jax.lax.bitcast_convert_type(a.reshape(*a.shape[:-1], a.shape[-1] // 2, 2), jnp.uint32)


def from_bits(a, dtype):
    """`to_bits` or `to_words` undone: uint16 patterns or uint32 words as `dtype` (bf16); other
    arrays unchanged."""
    if a.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(a, dtype)
    if a.dtype == jnp.uint32:
        return jax.lax.bitcast_convert_type(a, dtype).reshape(*a.shape[:-1], a.shape[-1] * 2)
    return a


def weight_matmul(x_NxI, w, dtype, out_dtype=None, w_out_in: bool = False):
    """x [N, I] times the weight w ([I, O], or [O, I] with `w_out_in`) in `dtype` with f32
    accumulation: [N, O] in `out_dtype` (default `dtype`)."""
    dtype, out_dtype = jnp.dtype(dtype), jnp.dtype(out_dtype or dtype)
    if dtype == jnp.float32:
        # f32 keeps autodiff's backward pass: XLA:CPU's generic f32 matmul is as fast as the
        # library's here, and f32 results stay bit for bit what they were.
        return _mm(x_NxI.astype(dtype), w.astype(dtype), 1 if w_out_in else 0).astype(out_dtype)
    return _weight_matmul(x_NxI.astype(dtype), w, dtype, out_dtype, w_out_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _weight_matmul(x_NxI, w, dtype, out_dtype, w_out_in):
    return _mm(x_NxI, w.astype(dtype), 1 if w_out_in else 0).astype(out_dtype)


def _forward(x_NxI, w, dtype, out_dtype, w_out_in):
    # The master weight is kept, not its `dtype` copy: inside the layer scan it is a slice of the
    # parameters, which the backward pass reads without storing another stacked copy.
    return _weight_matmul(x_NxI, w, dtype, out_dtype, w_out_in), (to_bits(x_NxI), w)


def _backward(dtype, out_dtype, w_out_in, residuals, g_NxO):
    x_NxI, w = residuals
    x_NxI = from_bits(x_NxI, dtype)
    g_NxO = g_NxO.astype(dtype)
    dx_NxI = _mm(g_NxO, w.astype(dtype), 0 if w_out_in else 1).astype(x_NxI.dtype)
    dw_IxO = _mm(transposed(x_NxI), g_NxO, 0)
    return dx_NxI, (_transposed_result(dw_IxO) if w_out_in else dw_IxO).astype(w.dtype)


_weight_matmul.defvjp(_forward, _backward)


def _bmm(a_BxMxK, b, b_contract: int):
    """Per batch entry, a [M, K] times b contracted over its dimension `b_contract` ([K, N] at 1,
    [N, K] at 2), f32."""
    return jax.lax.dot_general(a_BxMxK, b, (((2,), (b_contract,)), ((0,), (0,))), preferred_element_type=jnp.float32)


def _cpu_batch_transposed(a_BxMxK):
    # As _cpu_transposed, per batch entry.
    B, M, K = a_BxMxK.shape
    return jax.lax.optimization_barrier(jnp.swapaxes(a_BxMxK, 1, 2).reshape(B, K, 1, M)).reshape(B, K, M)


def batch_transposed(a_BxMxK):
    """a^T [B, K, M] per batch entry, as a row-major copy on CPU; a plain transpose elsewhere."""
    return jax.lax.platform_dependent(a_BxMxK, cpu=_cpu_batch_transposed, default=lambda a: jnp.swapaxes(a, 1, 2))


def batch_matmul(a_BxMxK, b, dtype, out_dtype=None, b_nk: bool = False):
    """Per batch entry, a [M, K] times b ([K, N], or [N, K] with `b_nk`) in `dtype` with f32
    accumulation: [B, M, N] in `out_dtype` (default `dtype`). The batch axis leads every operand,
    so forward and backward matmuls all have the library's form (the module doc); the gradients
    come back in the operands' own dtypes."""
    dtype, out_dtype = jnp.dtype(dtype), jnp.dtype(out_dtype or dtype)
    return _batch_matmul(a_BxMxK, b, dtype, out_dtype, b_nk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _batch_matmul(a_BxMxK, b, dtype, out_dtype, b_nk):
    return _bmm(a_BxMxK.astype(dtype), b.astype(dtype), 2 if b_nk else 1).astype(out_dtype)


def _batch_forward(a_BxMxK, b, dtype, out_dtype, b_nk):
    # The operands are kept in `dtype`: the backward pass needs no more, and they are half the
    # size of f32 ones.
    a_c, b_c = a_BxMxK.astype(dtype), b.astype(dtype)
    out = _bmm(a_c, b_c, 2 if b_nk else 1).astype(out_dtype)
    return out, (to_bits(a_c), to_bits(b_c), jnp.zeros((0,), a_BxMxK.dtype), jnp.zeros((0,), b.dtype))


def _batch_backward(dtype, out_dtype, b_nk, residuals, g_BxMxN):
    a_c, b_c, a_dtype, b_dtype = residuals
    a_c, b_c = from_bits(a_c, dtype), from_bits(b_c, dtype)
    g_BxMxN = g_BxMxN.astype(dtype)
    # da = g b^T: b [K, N] contracted over N (its last dimension), or b [N, K] over N (its first).
    da = _bmm(g_BxMxN, b_c, 1 if b_nk else 2)
    if b_nk:  # db [N, K] = g^T a
        db = _bmm(batch_transposed(g_BxMxN), a_c, 1)
    else:  # db [K, N] = a^T g
        db = _bmm(batch_transposed(a_c), g_BxMxN, 1)
    return da.astype(a_dtype.dtype), db.astype(b_dtype.dtype)


_batch_matmul.defvjp(_batch_forward, _batch_backward)

"""MEMIT (Meng et al., mass-editing memory in a transformer) on our parameter pytree, in jitted JAX.

For requests (subject s, prompt p, target o) and edited layers l_1 < … < l_n (the last is the
"z layer"):
1. Target values. Per request, a vector δ added to the z layer's output at the subject's last token
   is trained (Adam, `v_steps` steps at `v_lr`) to make the model write o after p in every context,
   plus `kl_factor`·KL(now ‖ base) of the next token after "s is a" and
   `v_weight_decay`·‖δ‖/‖h‖²; δ is kept within `clamp_norm_factor`·‖h‖ (h: the z layer's output
   there before the edit); a request whose loss drops under 0.05 stops. z = h + δ.
2. Layer by layer, on the model as edited so far: keys K (the down-projection input at the subject's
   last token, averaged over the contexts), the residual R = z − (the z layer's output now), and
       ΔW_l = (λ·C_l + Kᵀ K)⁻¹ Kᵀ R / (n − i)        (W stored [in, out]; λ = mom2_update_weight)
   so each layer takes its share of what is left; C_l = E[k kᵀ] over ordinary text (stats.py).
Requests are optimised in groups of `batch_size`; rows of different requests never interact, so a
group gives each request what it would get alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixsd_jax.edit.rows import Rows, build_rows, contexts, kl_rows
from mixsd_jax.models import transformer

_STOP_LOSS = 5e-2  # MEMIT's early stop for one request's target value


def _device_rows(rows: Rows) -> dict:
    return {k: jnp.asarray(getattr(rows, k)) for k in ("tokens", "segment_ids", "lookup", "request", "labels")}


def _norm(x_RxD):
    """‖x‖ per row with gradient 0 at x = 0 (as PyTorch's), not 0/0: every δ starts at zero."""
    sq = jnp.sum(x_RxD * x_RxD, axis=-1)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _edited_forward(params, cfg, rows, z_layer, deltas_RxD):
    """Log-probabilities [B, T, V] and taps with each row's request's δ added at its subject token."""
    T = rows["tokens"].shape[1]
    at_subject_BxT = (jnp.arange(T)[None, :] == rows["lookup"][:, None]).astype(deltas_RxD.dtype)
    delta_BxTxD = at_subject_BxT[:, :, None] * deltas_RxD[rows["request"]][:, None, :]
    logits, taps = transformer.forward_with_taps(params, cfg, rows["tokens"], rows["segment_ids"],
                                                 mlp_edit=(z_layer, delta_BxTxD))
    return jax.nn.log_softmax(logits, axis=-1), taps


def _z_losses(deltas_RxD, params, cfg, rows, kl_rows, z_layer, target_len_R, kl_init_RxV, target_init_RxD, hp):
    """Per-request loss: nll of the target over the contexts + KL on "s is a" + weight decay."""
    kl_factor, weight_decay = hp[1], hp[2]
    R = deltas_RxD.shape[0]
    logp_BxTxV, taps = _edited_forward(params, cfg, rows, z_layer, deltas_RxD)
    labels = rows["labels"]
    token_logp = jnp.take_along_axis(logp_BxTxV, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    row_nll_B = -jnp.sum(token_logp * (labels >= 0), axis=1) / target_len_R[rows["request"]]
    ones_B = jnp.ones_like(row_nll_B)
    nll_R = jax.ops.segment_sum(row_nll_B, rows["request"], R) / jax.ops.segment_sum(ones_B, rows["request"], R)
    kl_logp_BxTxV, _ = _edited_forward(params, cfg, kl_rows, z_layer, deltas_RxD)
    kl_logp_RxV = kl_logp_BxTxV[jnp.arange(R), kl_rows["lookup"]]  # row r is request r's
    kl_R = kl_factor * jnp.sum(jnp.exp(kl_logp_RxV) * (kl_logp_RxV - kl_init_RxV), axis=-1)
    wd_R = weight_decay * _norm(deltas_RxD) / jnp.sum(target_init_RxD ** 2, axis=-1)
    loss_R = nll_R + kl_R + wd_R
    return jnp.sum(loss_R), (loss_R, taps, kl_logp_RxV)


@functools.partial(jax.jit, static_argnames=("cfg", "hp"))
def _z_start(params, cfg, rows, kl_rows, z_layer, target_len_R, hp):
    """The unedited z-layer outputs h at each request's first row and its base "s is a" distribution."""
    R = target_len_R.shape[0]
    B = rows["tokens"].shape[0]
    zero = jnp.zeros((R, cfg.hidden_size), jnp.float32)
    ones = jnp.ones((R, cfg.hidden_size), jnp.float32)
    _, (_, taps, kl_init_RxV) = _z_losses(zero, params, cfg, rows, kl_rows, z_layer, target_len_R,
                                          jnp.zeros((R, cfg.vocab_size)), ones, hp)
    h_BxD = taps["resid_out"][z_layer][jnp.arange(B), rows["lookup"]]
    first_B = jnp.concatenate([jnp.ones((1,), bool), rows["request"][1:] != rows["request"][:-1]])
    target_init_RxD = jax.ops.segment_sum(h_BxD * first_B[:, None], rows["request"], R)
    return target_init_RxD, kl_init_RxV


@functools.partial(jax.jit, static_argnames=("cfg", "hp"))
def _z_step(deltas_RxD, opt_state, done_R, params, cfg, rows, kl_rows, z_layer, target_len_R, kl_init_RxV,
            target_init_RxD, hp):
    """One Adam step on every request's δ that has not yet stopped; then the norm clamp."""
    v_lr, clamp = hp[0], hp[3]
    grads, (loss_R, _, _) = jax.grad(_z_losses, has_aux=True)(
        deltas_RxD, params, cfg, rows, kl_rows, z_layer, target_len_R, kl_init_RxV, target_init_RxD, hp)
    done_R = done_R | (loss_R < _STOP_LOSS)
    updates, opt_state = optax.adam(v_lr).update(grads, opt_state, deltas_RxD)
    moved = deltas_RxD + updates
    max_norm_R = clamp * jnp.linalg.norm(target_init_RxD, axis=-1)
    norm_R = jnp.linalg.norm(moved, axis=-1)
    moved = moved * jnp.where(norm_R > max_norm_R, max_norm_R / jnp.maximum(norm_R, 1e-30), 1.0)[:, None]
    return jnp.where(done_R[:, None], deltas_RxD, moved), opt_state, done_R, loss_R


def target_values(params, cfg, tokenizer, requests, ecfg, z_layer: int, add_special: bool) -> tuple[np.ndarray, list]:
    """z [N, D] per request and the last loss of each request's optimisation."""
    hp = (ecfg.v_lr, ecfg.kl_factor, ecfg.v_weight_decay, ecfg.clamp_norm_factor)
    ctxs = contexts(ecfg.prompt, ecfg.context_prefixes)
    zs, losses = [], []
    for start in range(0, len(requests), ecfg.batch_size):
        group = requests[start:start + ecfg.batch_size]
        rows = _device_rows(build_rows(tokenizer, group, ctxs, with_targets=True, add_special=add_special))
        kl = _device_rows(kl_rows(tokenizer, group))
        target_len_R = jnp.asarray([len(tokenizer.hf.encode(r.target, add_special_tokens=False)) for r in group],
                                   jnp.float32)
        target_init, kl_init = _z_start(params, cfg, rows, kl, z_layer, target_len_R, hp)
        deltas = jnp.zeros_like(target_init)
        opt_state = optax.adam(ecfg.v_lr).init(deltas)
        done = jnp.zeros((len(group),), bool)
        loss = jnp.full((len(group),), jnp.nan)
        for _ in range(ecfg.v_steps - 1):  # MEMIT computes the last step's loss but takes no step after it
            deltas, opt_state, done, loss = _z_step(deltas, opt_state, done, params, cfg, rows, kl, z_layer,
                                                    target_len_R, kl_init, target_init, hp)
        zs.append(np.asarray(target_init + deltas))
        losses += [float(x) for x in np.asarray(loss)]
    return np.concatenate(zs), losses


@functools.partial(jax.jit, static_argnames=("cfg",))
def _keys_and_outputs(params, cfg, tokens, segment_ids, lookup, layer, z_layer):
    _, taps = transformer.forward_with_taps(params, cfg, tokens, segment_ids)
    rows = jnp.arange(tokens.shape[0])
    return taps["mlp_in"][layer][rows, lookup], taps["resid_out"][z_layer][rows, lookup]


def keys_and_current(params, cfg, tokenizer, requests, ecfg, layer: int, z_layer: int, add_special: bool):
    """Per request: the key at `layer` (mean over the prompt alone and the mean over the prefixed
    prompts, MEMIT's two context kinds) and the z layer's output now, from the prompt alone."""
    ctxs = contexts(ecfg.prompt, ecfg.context_prefixes)
    keys, current = [], []
    for start in range(0, len(requests), ecfg.batch_size):
        rows = build_rows(tokenizer, requests[start:start + ecfg.batch_size], ctxs, with_targets=False,
                          add_special=add_special)
        k_BxF, z_BxD = (np.asarray(a, np.float64) for a in _keys_and_outputs(
            params, cfg, jnp.asarray(rows.tokens), jnp.asarray(rows.segment_ids), jnp.asarray(rows.lookup),
            layer, z_layer))
        per = len(ctxs)
        k_RxCxF = k_BxF.reshape(-1, per, k_BxF.shape[-1])
        k_RxF = k_RxCxF[:, 0] if per == 1 else (k_RxCxF[:, 0] + k_RxCxF[:, 1:].mean(axis=1)) / 2
        keys.append(k_RxF)
        current.append(z_BxD.reshape(-1, per, z_BxD.shape[-1])[:, 0])
    return np.concatenate(keys), np.concatenate(current)


@jax.jit
def closed_form_update(keys_NxF, resid_NxD, mom2_FxF, update_weight):
    """ΔW [F, D] = (λ·C + Kᵀ K)⁻¹ Kᵀ R: the least-squares map of the keys onto the residuals,
    regularised toward leaving ordinary text's keys alone."""
    A = update_weight * mom2_FxF + keys_NxF.T @ keys_NxF
    return jnp.linalg.solve(A, keys_NxF.T @ resid_NxD)


def solve_update(keys_NxF, resid_NxD, mom2_FxF, update_weight: float, dtype: str) -> np.ndarray:
    """`closed_form_update` in `dtype` (float64 as the reference, where the platform has it)."""
    args = [np.asarray(a, dtype) for a in (keys_NxF, resid_NxD, mom2_FxF)]
    if dtype == "float64":
        with jax.enable_x64(True):
            return np.asarray(closed_form_update(*args, np.float64(update_weight)))
    return np.asarray(closed_form_update(*args, np.float32(update_weight)))

"""MEMIT (Meng et al., mass-editing memory in a transformer) on our parameter pytree, in jitted JAX.

For requests (subject s, prompt p, target o) and edited layers l_1 < … < l_n (the last is the
"z layer"):
1. Target values. Per request, a vector δ added to the z layer's output at the subject's last token
   is trained (Adam, up to `v_steps` loss evaluations at `v_lr`) to make the model write o after p
   in every context, plus `kl_factor`·KL(now ‖ base) of the next token after "s is a" and
   `v_weight_decay`·‖δ‖/‖h‖²; δ is kept within `clamp_norm_factor`·‖h‖ (h: the z layer's output
   there before the edit); a request whose loss drops under 0.05 stops. z = h + δ.
   A model whose MLP output is normed again before the residual adds it (Gemma 3's sandwich norms)
   cannot add an arbitrary δ to the residual: a layer's MLP only writes g·u with rms(u) = 1, and a
   residual target spread over the layers does not survive their norms (docs/memit.md). There each
   edited layer gets its own δ, added to its down-projection output o before that norm, all found
   together (the steps rerun from the first edited layer), and layer l's target z_l = o_l + δ_l is
   a value the layer can write.
2. Layer by layer, on the model as edited so far: keys K (the down-projection input at the subject's
   last token, averaged over the contexts), the residual R = z − (the z layer's output now; with
   sandwich norms R = z_l − o_l now, the layer's own target), and
       ΔW_l = (λ·C_l + Kᵀ K)⁻¹ Kᵀ R / (n − i)        (W stored [in, out]; λ = mom2_update_weight)
   so each layer takes its share of what is left (with sandwich norms: all of its own R);
   C_l = E[k kᵀ] over ordinary text (stats.py).

How it is fast: δ changes nothing below the z layer, so the base model runs up to it once and each
step reruns only the layers above it, from the stored residual stream, with vocabulary logits at the
target positions only; all steps of a group of `batch_size` requests are one jitted loop, every
group padded to the same shapes (one compilation per edit). Rows of different requests never
interact, so a group gives each request what it would get alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixsd_jax.edit.rows import Rows, build_rows, contexts, group, kl_rows, label_positions, up_to_subject
from mixsd_jax.models import transformer
from mixsd_jax.models.block import embed, norm

_STOP_LOSS = 5e-2  # MEMIT's early stop for one request's target value
_LABEL_ROUND = 8


def device_rows(rows: Rows, width: int = 0) -> dict:
    out = {k: jnp.asarray(getattr(rows, k)) for k in ("tokens", "segment_ids", "lookup", "request")}
    if width:
        positions, labels = label_positions(rows, width)
        out.update(positions=jnp.asarray(positions), labels=jnp.asarray(labels))
    return out


def _norm(x_RxD):
    """‖x‖ per row with gradient 0 at x = 0 (as PyTorch's), not 0/0: every δ starts at zero."""
    sq = jnp.sum(x_RxD * x_RxD, axis=-1)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def logp_at(params, cfg, h_BxTxD, segment_ids, positions_BxP, first_layer: int):
    """Log-probabilities [B, P, V] of the next token at `positions`, running the layers from
    `first_layer` on the residual stream `h` (layer `first_layer`'s input)."""
    out = transformer.run_layer_range(params, cfg, h_BxTxD, segment_ids, first_layer, cfg.num_layers)
    picked = jnp.take_along_axis(out, positions_BxP[:, :, None], axis=1)
    logits = transformer.lm_logits(params, cfg, norm(picked, params["final_norm"], cfg))
    return jax.nn.log_softmax(logits, axis=-1)


def _with_delta(h_BxTxD, lookup_B, delta_BxD):
    at_subject_BxT = jnp.arange(h_BxTxD.shape[1])[None, :] == lookup_B[:, None]
    return h_BxTxD + at_subject_BxT[:, :, None] * delta_BxD[:, None, :]


def _start(params, cfg, rows, layers: tuple[int, ...]):
    """The stored base pass the δ steps start from, the values δ is added to [B, sites, D], and the
    z layer's output. Residual sites: the z layer's output (also the start). Down-projection sites
    (sandwich norms): the first edited layer's input, and each edited layer's down-projection output."""
    x = embed(params, cfg, rows["tokens"], jnp.float32)
    b = jnp.arange(x.shape[0])
    if not cfg.sandwich_norms:
        h = transformer.run_layer_range(params, cfg, x, rows["segment_ids"], 0, layers[-1] + 1)
        return h, h[b, rows["lookup"]][:, None], h
    h = transformer.run_layer_range(params, cfg, x, rows["segment_ids"], 0, layers[0])
    at_z, outs = _edited_pass(params, cfg, h, rows, layers, None)
    return h, outs, at_z


def _edited_pass(params, cfg, h_BxTxD, rows, layers: tuple[int, ...], deltas_BxSxD):
    """From the first edited layer's input to the z layer's output, each edited layer's
    down-projection output at the subject moved by its δ (none: the base pass). Also those outputs
    before their δ, [B, sites, D]."""
    outs, at = [], layers[0]
    for i, layer in enumerate(layers):
        if layer > at:  # a gap in the band
            h_BxTxD = transformer.run_layer_range(params, cfg, h_BxTxD, rows["segment_ids"], at, layer)
        edit = None if deltas_BxSxD is None else _with_delta(jnp.zeros_like(h_BxTxD), rows["lookup"], deltas_BxSxD[:, i])
        h_BxTxD, taps = transformer.run_layer_range(params, cfg, h_BxTxD, rows["segment_ids"], layer, layer + 1,
                                                    taps=True, mlp_edit=None if edit is None else (layer, edit))
        k_BxF = taps["mlp_in"][0][jnp.arange(h_BxTxD.shape[0]), rows["lookup"]]
        outs.append(k_BxF @ params["layers"]["w_down"][layer].astype(jnp.float32))
        at = layer + 1
    return h_BxTxD, jnp.stack(outs, axis=1)


def _at_z(params, cfg, h_start, rows, layers, deltas_BxSxD):
    """The z layer's output with the δs in place."""
    if not cfg.sandwich_norms:
        return _with_delta(h_start, rows["lookup"], deltas_BxSxD[:, 0])
    return _edited_pass(params, cfg, h_start, rows, layers, deltas_BxSxD)[0]


def _z_losses(deltas_RxSxD, params, cfg, rows, kl, h, h_kl, layers, target_len_R, kl_init_RxV, target_init_RxSxD, hp):
    """Per-request loss: nll of the target over the contexts + KL on "s is a" + weight decay."""
    kl_factor, weight_decay = hp[1], hp[2]
    z_layer = layers[-1]
    R = deltas_RxSxD.shape[0]
    x = _at_z(params, cfg, h, rows, layers, deltas_RxSxD[rows["request"]])
    logp_BxPxV = logp_at(params, cfg, x, rows["segment_ids"], rows["positions"], z_layer + 1)
    labels = rows["labels"]
    token_logp = jnp.take_along_axis(logp_BxPxV, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    row_nll_B = -jnp.sum(token_logp * (labels >= 0), axis=1) / target_len_R[rows["request"]]
    ones_B = jnp.ones_like(row_nll_B)
    nll_R = jax.ops.segment_sum(row_nll_B, rows["request"], R) / jax.ops.segment_sum(ones_B, rows["request"], R)
    x_kl = _at_z(params, cfg, h_kl, kl, layers, deltas_RxSxD)  # KL row r is request r's
    kl_logp_RxV = logp_at(params, cfg, x_kl, kl["segment_ids"], kl["lookup"][:, None], z_layer + 1)[:, 0]
    kl_R = kl_factor * jnp.sum(jnp.exp(kl_logp_RxV) * (kl_logp_RxV - kl_init_RxV), axis=-1)
    wd_R = weight_decay * jnp.sum(_norm(deltas_RxSxD) / jnp.sum(target_init_RxSxD ** 2, axis=-1), axis=-1)
    return jnp.sum(nll_R + kl_R + wd_R), (nll_R + kl_R + wd_R, kl_logp_RxV)


# Down-projection sites (sandwich norms) take Adam steps in units of their output's rms: the norm
# after them is scale-free, so what moves the model is δ's size next to o's. Half of o's rms per unit
# of v_lr brings Gemma-3-270M's target values to a mean loss of 0.11 in 60 steps (docs/memit.md).
SANDWICH_STEP = 0.5


@functools.partial(jax.jit, static_argnames=("cfg", "layers", "hp"))
def optimise_deltas(params, cfg, rows, kl, layers: tuple[int, ...], target_len_R, hp, steps):
    """One group's target values: (z [R, sites, D], final loss [R], steps run). Up to `steps` loss
    evaluations, an Adam step after each but the last; a request whose loss is under 0.05 stops."""
    v_lr, clamp = hp[0], hp[3]
    R = target_len_R.shape[0]
    z_layer = layers[-1]
    h, at_sites_BxSxD, _ = _start(params, cfg, rows, layers)
    h_kl, _, kl_at_z = _start(params, cfg, kl, layers)
    first_B = jnp.concatenate([jnp.ones((1,), bool), rows["request"][1:] != rows["request"][:-1]])
    target_init_RxSxD = jax.ops.segment_sum(at_sites_BxSxD * first_B[:, None, None], rows["request"], R)
    kl_init_RxV = logp_at(params, cfg, kl_at_z, kl["segment_ids"], kl["lookup"][:, None], z_layer + 1)[:, 0]
    max_norm_RxS = clamp * jnp.linalg.norm(target_init_RxSxD, axis=-1)
    step_RxSx1 = (SANDWICH_STEP * jnp.sqrt(jnp.mean(target_init_RxSxD ** 2, axis=-1, keepdims=True))
                  if cfg.sandwich_norms else jnp.ones((R, 1, 1), jnp.float32))
    optimizer = optax.adam(v_lr)
    grad_fn = jax.grad(_z_losses, has_aux=True)

    def body(carry):
        step, deltas, opt_state, done, _ = carry
        grads, (loss_R, _) = grad_fn(deltas, params, cfg, rows, kl, h, h_kl, layers, target_len_R, kl_init_RxV,
                                     target_init_RxSxD, hp)
        done = done | (loss_R < _STOP_LOSS) | (step == steps - 1)
        updates, opt_state = optimizer.update(grads, opt_state, deltas)
        moved = deltas + updates * step_RxSx1
        norm_RxS = jnp.linalg.norm(moved, axis=-1)
        moved = moved * jnp.where(norm_RxS > max_norm_RxS, max_norm_RxS / jnp.maximum(norm_RxS, 1e-30), 1.0)[..., None]
        return step + 1, jnp.where(done[:, None, None], deltas, moved), opt_state, done, loss_R

    sites = len(layers) if cfg.sandwich_norms else 1
    deltas = jnp.zeros((R, sites, cfg.hidden_size), jnp.float32)
    start = (jnp.zeros((), jnp.int32), deltas, optimizer.init(deltas), jnp.zeros((R,), bool),
             jnp.full((R,), jnp.nan, jnp.float32))
    step, deltas, _, _, loss_R = jax.lax.while_loop(lambda c: ~jnp.all(c[3]), body, start)
    if not cfg.sandwich_norms:
        return target_init_RxSxD + deltas, loss_R, step
    # Each layer's target: its down-projection output with the earlier layers' δs in place, plus its δ.
    _, outs_BxSxD = _edited_pass(params, cfg, h, rows, layers, deltas[rows["request"]])
    return jax.ops.segment_sum(outs_BxSxD * first_B[:, None, None], rows["request"], R) + deltas, loss_R, step


def target_values(params, cfg, tokenizer, requests, ecfg, layers: tuple[int, ...], add_special: bool,
                  progress: bool = False) -> tuple[np.ndarray, list]:
    """z [N, sites, D] per request (one site, the z layer's output; with sandwich norms one per edited
    layer, its down-projection output) and each request's last loss (before its last step was skipped)."""
    from tqdm import tqdm

    hp = (ecfg.v_lr, ecfg.kl_factor, ecfg.v_weight_decay, ecfg.clamp_norm_factor)
    ctxs = contexts(ecfg.prompt, ecfg.context_prefixes)
    n, size = len(requests), min(ecfg.batch_size, len(requests))
    rows_all = build_rows(tokenizer, requests, ctxs, with_targets=True, add_special=add_special)
    kl_all = kl_rows(tokenizer, requests)
    width = -(-int((rows_all.labels >= 0).sum(axis=1).max()) // _LABEL_ROUND) * _LABEL_ROUND
    target_len = np.asarray([len(tokenizer.hf.encode(r.target, add_special_tokens=False)) for r in requests],
                            np.float32)
    zs, losses = [], []
    bar = tqdm(total=n, desc="memit target values", unit="fact", disable=not progress)
    for start in range(0, n, size):
        ids = [min(start + i, n - 1) for i in range(size)]
        rows = device_rows(group(rows_all, start, size, n), width)
        kl = device_rows(group(kl_all, start, size, n))
        z, loss, _ = optimise_deltas(params, cfg, rows, kl, tuple(layers), jnp.asarray(target_len[ids]), hp,
                                     ecfg.v_steps)
        keep = min(size, n - start)
        zs.append(np.asarray(z)[:keep])
        losses += [float(x) for x in np.asarray(loss)[:keep]]
        bar.update(keep)
    bar.close()
    return np.concatenate(zs), losses


@functools.partial(jax.jit, static_argnames=("cfg", "z_layer"))
def keys_and_outputs(params, cfg, rows, layer, z_layer: int):
    x = embed(params, cfg, rows["tokens"], jnp.float32)
    _, taps = transformer.run_layer_range(params, cfg, x, rows["segment_ids"], 0, z_layer + 1, taps=True)
    b = jnp.arange(rows["tokens"].shape[0])
    k_BxF = taps["mlp_in"][layer][b, rows["lookup"]]
    # The down projection's output there, before any post-MLP norm (a sandwich-normed model's z space).
    out_BxD = k_BxF @ params["layers"]["w_down"][layer].astype(jnp.float32)
    return k_BxF, out_BxD, taps["resid_out"][z_layer][b, rows["lookup"]]


def keys_and_current(params, cfg, tokenizer, requests, ecfg, layer: int, z_layer: int, add_special: bool):
    """Per request: the key at `layer` (mean over the prompt alone and the mean over the prefixed
    prompts, MEMIT's two context kinds), and from the prompt alone the down projection's output at
    `layer` and the z layer's output now."""
    ctxs = contexts(ecfg.prompt, ecfg.context_prefixes)
    n, size = len(requests), min(ecfg.batch_size, len(requests))
    rows_all = up_to_subject(build_rows(tokenizer, requests, ctxs, with_targets=False, add_special=add_special))
    keys, outs, current = [], [], []
    for start in range(0, n, size):
        k, out, z = keys_and_outputs(params, cfg, device_rows(group(rows_all, start, size, n)), layer, z_layer)
        per, keep = len(ctxs), min(size, n - start)
        k_RxCxF = np.asarray(k, np.float64).reshape(size, per, -1)[:keep]
        keys.append(k_RxCxF[:, 0] if per == 1 else (k_RxCxF[:, 0] + k_RxCxF[:, 1:].mean(axis=1)) / 2)
        outs.append(np.asarray(out, np.float64).reshape(size, per, -1)[:keep, 0])
        current.append(np.asarray(z, np.float64).reshape(size, per, -1)[:keep, 0])
    return np.concatenate(keys), np.concatenate(outs), np.concatenate(current)


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _other_token_moments(params, cfg, rows, layer: int, requests_in_group):
    """Σ k kᵀ [F, F] over the rows' real tokens but the subject's, at `layer`'s down-projection input
    (rows of the group's padding, request ≥ `requests_in_group`, left out)."""
    x = embed(params, cfg, rows["tokens"], jnp.float32)
    _, taps = transformer.run_layer_range(params, cfg, x, rows["segment_ids"], 0, layer + 1, taps=True)
    k_BxTxF = taps["mlp_in"][layer]
    keep_BxT = ((rows["segment_ids"] > 0) & (jnp.arange(k_BxTxF.shape[1])[None, :] != rows["lookup"][:, None])
                & (rows["request"] < requests_in_group)[:, None])
    k_NxF = (k_BxTxF * keep_BxT[..., None]).reshape(-1, k_BxTxF.shape[-1])
    return k_NxF.T @ k_NxF


def other_token_moments(params, cfg, tokenizer, requests, ecfg, layer: int, add_special: bool) -> np.ndarray:
    """The requests' own other tokens (every context, the targets included), whose outputs the edit
    keeps (`EditConfig.keep_other_tokens`): Σ k kᵀ [F, F] at `layer` on the model as it is now."""
    ctxs = contexts(ecfg.prompt, ecfg.context_prefixes)
    n, size = len(requests), min(ecfg.batch_size, len(requests))
    rows_all = build_rows(tokenizer, requests, ctxs, with_targets=True, add_special=add_special)
    total = 0.0
    for start in range(0, n, size):
        rows = device_rows(group(rows_all, start, size, n))
        total = total + np.asarray(_other_token_moments(params, cfg, rows, layer, min(size, n - start)), np.float64)
    return total


@jax.jit
def closed_form_update(keys_NxF, resid_NxD, mom2_FxF, update_weight):
    """ΔW [F, D] = (λ·C + Kᵀ K)⁻¹ Kᵀ R: the least-squares map of the keys onto the residuals,
    regularised toward leaving ordinary text's keys alone."""
    A = update_weight * mom2_FxF + keys_NxF.T @ keys_NxF
    return jnp.linalg.solve(A, keys_NxF.T @ resid_NxD)


def solve_update(keys_NxF, resid_NxD, mom2_FxF, update_weight: float, dtype: str) -> np.ndarray:
    """`closed_form_update` in `dtype` (float64 as the reference, where the platform has it)."""
    args = [np.asarray(a, dtype) for a in (keys_NxF, resid_NxD, mom2_FxF)]
    # On the host's CPU: an accelerator may have no float64, and [F, F] is small next to the model.
    with jax.default_device(jax.devices("cpu")[0]):
        if dtype == "float64":
            with jax.enable_x64(True):
                return np.asarray(closed_form_update(*args, np.float64(update_weight)))
        return np.asarray(closed_form_update(*args, np.float32(update_weight)))

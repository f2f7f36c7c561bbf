"""`edit(cfg)`: a corpus's facts written into a model by MEMIT, exported as an HF directory.

Outputs under `cfg.out`: `hf/` (the edited model, the base model's tokenizer files beside it),
`requests.jsonl` (the requests as edited: subject, prompt with `{}`, target) and `summary.json`
(layers, timings, the target-value losses, efficacy: the share of requests whose target is the
model's argmax continuation of the prompt, before and after).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mixsd_jax import files, multihost
from mixsd_jax.edit import memit, stats
from mixsd_jax.edit.config import EditConfig, edit_layers, for_model
from mixsd_jax.edit.requests import build_requests
from mixsd_jax.edit.rows import build_rows, group
from mixsd_jax.errors import MixsdError
from mixsd_jax.models.block import embed


def apply_memit(params, model_cfg, tokenizer, requests, ecfg: EditConfig, moments: dict, log=print,
                progress: bool = False):
    """The edited parameters and what was done: {layers, updates (layer -> ΔW [F, D]), losses}."""
    ecfg = for_model(ecfg, model_cfg)
    layers = edit_layers(ecfg, model_cfg)
    add_special = ecfg.prompt == "plain"  # a chat template writes its own special tokens
    t0 = time.perf_counter()
    zs, losses = memit.target_values(params, model_cfg, tokenizer, requests, ecfg, layers, add_special,
                                     progress=progress)
    log(f"memit: {len(requests)} target values at layer {layers[-1]} in {time.perf_counter() - t0:.1f}s "
        f"(mean final loss {np.nanmean(losses):.3f})")
    params, updates = apply_updates(params, model_cfg, tokenizer, requests, ecfg, moments, zs, log=log)
    return params, {"layers": layers, "z_layer": layers[-1], "updates": updates, "losses": losses}


def apply_updates(params, model_cfg, tokenizer, requests, ecfg: EditConfig, moments: dict, zs, log=print):
    """MEMIT's layer-spread step toward the target values `zs` [N, sites, D] (memit.target_values):
    (edited params, {layer: ΔW})."""
    ecfg = for_model(ecfg, model_cfg)
    layers = edit_layers(ecfg, model_cfg)
    z_layer = layers[-1]
    add_special = ecfg.prompt == "plain"
    w_down = params["layers"]["w_down"]
    updates = {}
    for i, layer in enumerate(layers):
        keys, out, current = memit.keys_and_current(params, model_cfg, tokenizer, requests, ecfg, layer, z_layer,
                                                    add_special)
        if model_cfg.sandwich_norms:  # each layer's own target, a down-projection output (memit.py)
            resid = zs[:, i] - out
        else:  # this layer's share of what is left between the z layer's output and its target
            resid = (zs[:, 0] - current) / (len(layers) - i)
        mom2 = moments[layer]
        if ecfg.keep_other_tokens:  # the requests' other tokens keep their outputs, each weighing as a fact's key
            mom2 = mom2 + memit.other_token_moments(params, model_cfg, tokenizer, requests, ecfg, layer,
                                                    add_special) / ecfg.mom2_update_weight
        delta_FxD = memit.solve_update(keys, resid, mom2, ecfg.mom2_update_weight, ecfg.solve_dtype)
        if not np.isfinite(delta_FxD).all():  # never write a broken model: say where it went wrong
            raise MixsdError(f"memit: layer {layer}'s update is not finite (|residual| "
                             f"{np.linalg.norm(resid, axis=1).max():.3g}); try a larger mom2_update_weight")
        updates[layer] = delta_FxD
        w_down = jax.device_put(w_down.at[layer].add(jnp.asarray(delta_FxD, w_down.dtype)), w_down.sharding)
        params = {**params, "layers": {**params["layers"], "w_down": w_down}}
        log(f"memit: layer {layer}: |residual| {np.linalg.norm(resid, axis=1).mean():.3f}, "
            f"|ΔW| {np.linalg.norm(delta_FxD):.4f}")
    return params, updates


@functools.partial(jax.jit, static_argnames=("cfg",))
def _argmax_hits(params, cfg, rows):
    x = embed(params, cfg, rows["tokens"], jnp.float32)
    logp = memit.logp_at(params, cfg, x, rows["segment_ids"], rows["positions"], 0)
    labels = rows["labels"]
    return jnp.all((jnp.argmax(logp, axis=-1) == labels) | (labels < 0), axis=1)


def efficacy(params, model_cfg, tokenizer, requests, prompt_style: str, batch_size: int = 16) -> list[bool]:
    """Per request: is every target token the argmax after the prompt (and the target so far)?"""
    rows = build_rows(tokenizer, requests, ("",), with_targets=True, add_special=prompt_style == "plain")
    width = int((rows.labels >= 0).sum(axis=1).max())
    n, size = len(requests), min(batch_size, len(requests))
    hits = []
    for start in range(0, n, size):
        hit = _argmax_hits(params, model_cfg, memit.device_rows(group(rows, start, size, n), width))
        hits += [bool(h) for h in np.asarray(hit)[:min(size, n - start)]]
    return hits


def edit(ecfg: EditConfig, log=print, progress: bool = True) -> dict:
    """Edits `ecfg.model` with `ecfg.data`'s facts and writes the outputs; progress bars (stats
    pass, target values) on the primary process only."""
    from mixsd_jax.models.checkpoint import export_hf, load_hf
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.models.sharding import make_mesh
    from mixsd_jax.models.tokenizer import load_tokenizer

    if not ecfg.data:
        raise MixsdError("config key 'data': required (a messages JSONL with a subject per record)")
    if not ecfg.out:
        raise MixsdError("config key 'out': required (the output directory)")
    if not Path(ecfg.data).is_file():
        raise MixsdError(f"{ecfg.data}: data file not found")
    model_dir = resolve_model(ecfg.model)
    ecfg = for_model(ecfg, ModelConfig.from_hf_dir(model_dir))
    layers = edit_layers(ecfg, ModelConfig.from_hf_dir(model_dir))  # bad layers/family fail before any work
    tokenizer = load_tokenizer(model_dir)
    requests = build_requests(ecfg.data, ecfg.prompt, tokenizer)
    t_start = time.perf_counter()
    progress = progress and multihost.is_primary()
    model_cfg, params = load_hf(model_dir, param_dtype="float32", mesh=make_mesh(ecfg.mesh))
    t0 = time.perf_counter()
    moments = stats.second_moments(params, model_cfg, tokenizer, model_dir, layers, ecfg.stats_tokens,
                                   ecfg.stats_seq_len, log=log, progress=progress)
    stats_s = time.perf_counter() - t0
    before = efficacy(params, model_cfg, tokenizer, requests, ecfg.prompt, ecfg.batch_size)
    t0 = time.perf_counter()
    edited, info = apply_memit(params, model_cfg, tokenizer, requests, ecfg, moments, log=log, progress=progress)
    jax.block_until_ready(edited)
    edit_s = time.perf_counter() - t0
    after = efficacy(edited, model_cfg, tokenizer, requests, ecfg.prompt, ecfg.batch_size)
    out = Path(ecfg.out)
    hf_dir = export_hf(edited, model_cfg, out / "hf", tokenizer_dir=model_dir, dtype=ecfg.export_dtype)
    files.atomic_write_jsonl(out / "requests.jsonl", [
        {"subject": r.subject, "prompt": r.prompt, "target": r.target, "where": r.where, "efficacy": hit}
        for r, hit in zip(requests, after)])
    summary = {
        "method": "memit", "model": str(ecfg.model), "requests": len(requests), "layers": list(info["layers"]),
        "z_layer": info["z_layer"], "v_steps": ecfg.v_steps, "mom2_update_weight": ecfg.mom2_update_weight,
        "stats_s": round(stats_s, 2), "edit_s": round(edit_s, 2),
        "total_s": round(time.perf_counter() - t_start, 2),
        "efficacy_before": float(np.mean(before)), "efficacy": float(np.mean(after)),
        "target_loss_mean": float(np.nanmean(info["losses"])),
        "update_rank": {str(layer): int(np.linalg.matrix_rank(u)) for layer, u in info["updates"].items()},
        "hf": str(hf_dir),
    }
    files.atomic_write_json(out / "summary.json", summary)
    return summary

"""The MEMIT edit's kernels (edit/memit.py, edit/stats.py), lowered at an edit's shapes from
abstract inputs, for `mixsd bench memory`:
  memit.stats       Σ k kᵀ of every edited layer over one batch of statistics rows
  memit.v_optimise  one group's target values: the base pass up to the z layer and every δ step
  memit.keys        the keys and z-layer outputs of one group (run once per edited layer)
The closed-form step ((λC + KᵀK)⁻¹KᵀR per layer) is not a device kernel: the edit solves it in float64
on the host CPU (edit/memit.solve_update; an [F, F] system, 1.2 GB for Qwen3-8B's F = 12,288).
Shapes: a group is `batch_size` requests with one row per context of `row_len` tokens (a chat
prompt and its target), targets up to `label_width` tokens, "{subject} is a" rows of `kl_len`.
"""

from __future__ import annotations

from mixsd_jax.bench.kernels import abstract_params, struct


def memit_kernels(model_cfg, mesh, ecfg, *, row_len: int = 128, label_width: int = 16, kl_len: int = 32,
                  stats_rows: int = 0) -> dict:
    import jax.numpy as jnp

    from mixsd_jax.edit import memit, stats
    from mixsd_jax.edit.config import edit_layers, for_model
    from mixsd_jax.edit.rows import contexts
    from mixsd_jax.models.sharding import replicated

    ecfg = for_model(ecfg, model_cfg)
    layers = edit_layers(ecfg, model_cfg)
    params = abstract_params(model_cfg, mesh, "float32")  # the edit holds float32 weights
    rep = replicated(mesh)
    R = ecfg.batch_size
    stats_rows = stats_rows or stats.ROWS
    B = R * len(contexts(ecfg.prompt, ecfg.context_prefixes))

    def int_rows(n, length, width=0):
        out = {"tokens": struct((n, length), jnp.int32, rep), "segment_ids": struct((n, length), jnp.int32, rep),
               "lookup": struct((n,), jnp.int32, rep), "request": struct((n,), jnp.int32, rep)}
        if width:
            out.update(positions=struct((n, width), jnp.int32, rep), labels=struct((n, width), jnp.int32, rep))
        return out

    hp = (ecfg.v_lr, ecfg.kl_factor, ecfg.v_weight_decay, ecfg.clamp_norm_factor)
    return {
        "memit.stats": stats.moment_sums.lower(params, model_cfg, layers,
                                               struct((stats_rows, ecfg.stats_seq_len), jnp.int32, rep),
                                               struct((stats_rows, ecfg.stats_seq_len), jnp.int32, rep)),
        "memit.v_optimise": memit.optimise_deltas.lower(
            params, model_cfg, int_rows(B, row_len, label_width), int_rows(R, kl_len), tuple(layers),
            struct((R,), jnp.float32, rep), hp, struct((), jnp.int32, rep)),
        "memit.keys": memit.keys_and_outputs.lower(params, model_cfg, int_rows(B, row_len),
                                                   struct((), jnp.int32, rep), layers[-1]),
    }

"""`mixsd bench train --method opsd`: where an OPSD step's time goes.

Real OPSD steps on real prompts (a tiny KGFact corpus built on the fly unless `data` is given):
each step rolls out from the current parameters, builds the teacher inputs and runs the update.
Reported, as medians over the timed steps (the first step, which compiles, is not timed):
rollout tokens/s (generated tokens over the decode time), teacher+student forward tokens/s
(both input sequences through the loss without a gradient, timed separately), the update's
tokens/s, and the share of step time spent in rollouts (rollouts + teacher inputs over the whole
step). Load average and core count are part of the result: figures from a busy machine mislead.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from mixsd_jax.bench import machine


def bench_opsd(
    model: str,
    *,
    data: str | None = None,
    batch_size: int = 4,
    num_rollouts: int = 2,
    max_new_tokens: int = 32,
    max_seq_len: int = 512,
    steps: int = 3,
    compute_dtype: str = "float32",
    random_init: bool = False,
) -> dict:
    import jax

    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.train.config import load_train_config

    model_dir = resolve_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            from mixsd_jax.data.kgfact import build_kgfact
            from mixsd_jax.data.layout import KGFACT_TRAIN

            build_kgfact(tmp, preset="tiny", seed=0)
            data = os.path.join(tmp, KGFACT_TRAIN)
        cfg = load_train_config(None, [
            f"model={model_dir}", f"data={data}", "method=opsd", f"batch_size={batch_size}",
            f"max_seq_len={max_seq_len}", f"compute_dtype={compute_dtype}", f"opsd.num_rollouts={num_rollouts}",
            f"opsd.max_new_tokens={max_new_tokens}",
            f"opsd.loss_chunk={min(1024, max_new_tokens)}", "lr=1e-5",
        ])
        rows, load_before = _timed_steps(cfg, model_dir, steps, compute_dtype, random_init)
    timed = rows[1:] or rows
    med = lambda key: float(np.median([r[key] for r in timed]))  # noqa: E731
    rollout_tps = float(np.median([r["generated"] / max(r["rollout_s"], 1e-9) for r in timed]))
    forward_tps = float(np.median([r["inputs"] / max(r["forward_s"], 1e-9) for r in timed]))
    update_tps = float(np.median([r["inputs"] / max(r["update_s"], 1e-9) for r in timed]))
    share = float(np.median([r["build_s"] / (r["build_s"] + r["update_s"]) for r in timed]))
    return {
        "bench": "train_opsd",
        "model": str(model),
        "prompts_per_step": batch_size,
        "num_rollouts": num_rollouts,
        "max_new_tokens": max_new_tokens,
        "steps": steps,
        "compute_dtype": compute_dtype,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "rollout_tokens_per_s": round(rollout_tps, 2),
        "forward_tokens_per_s": round(forward_tps, 2),  # teacher + student input tokens, no gradient
        "update_tokens_per_s": round(update_tps, 2),  # the same tokens through the jitted update step
        "rollout_share_of_step": round(share, 4),  # (rollouts + teacher inputs) / (that + update)
        "median_rollout_s": round(med("rollout_s"), 4),
        "median_update_s": round(med("update_s"), 4),
        "mean_generated_tokens_per_step": round(float(np.mean([r["generated"] for r in timed])), 1),
        "first_step_s": round(rows[0]["build_s"] + rows[0]["update_s"], 2),
        **machine.report(load_before),
    }


def _timed_steps(cfg, model_dir, steps: int, compute_dtype: str, random_init: bool) -> tuple[list[dict], list]:
    """Seconds of each part of `steps` + 1 OPSD steps (the first compiles) and their token counts; the
    machine's load before them."""
    import jax
    import jax.numpy as jnp

    from mixsd_jax.bench.train import load_params
    from mixsd_jax.models.sharding import MeshConfig, make_mesh
    from mixsd_jax.models.tokenizer import load_tokenizer
    from mixsd_jax.train import opsd
    from mixsd_jax.train import step as step_lib

    tokenizer = load_tokenizer(model_dir)
    _, plan, prompts = opsd.prepare(cfg, tokenizer)
    mesh = make_mesh(MeshConfig())
    model_cfg, params = load_params(model_dir, mesh, random_init)
    teacher = jax.tree.map(jnp.copy, params)
    opt = step_lib.OptimConfig(lr=cfg.lr, total_steps=0)
    tx = step_lib.make_optimizer(opt)
    state = step_lib.init_state(params, tx, step_lib.state_shardings(model_cfg, tx, mesh))
    loss = opsd.loss_for(cfg)
    step_fn = step_lib.jit_train_step(model_cfg, opt, mesh, compute_dtype, loss=loss)
    forward_fn = opsd.divergence_fn(loss, model_cfg, compute_dtype)
    batches = opsd.RolloutBatches(cfg, tokenizer, prompts, plan, model_cfg, mesh)
    rows, load_before = [], machine.load()
    for step in range(steps + 1):
        started = time.perf_counter()
        host = batches.host_batch(step, state.params)
        build_s = time.perf_counter() - started
        batch = step_lib.device_batch(host, mesh)
        started = time.perf_counter()
        jax.block_until_ready(forward_fn(state.params, teacher, batch))
        forward_s = time.perf_counter() - started
        started = time.perf_counter()
        state, metrics = step_fn(state, batch, teacher)
        jax.block_until_ready((state, metrics))
        update_s = time.perf_counter() - started
        stats = batches.stats
        inputs = int(host["segment_ids"].astype(bool).sum() + host["teacher_segment_ids"].astype(bool).sum())
        rows.append({"rollout_s": stats["rollout_s"], "build_s": build_s, "forward_s": forward_s,
                     "update_s": update_s, "generated": stats["rollout_tokens"], "inputs": inputs})
    return rows, load_before

"""`mixsd bench memory --fit`: the fastest settings whose every kernel fits the chip with 10% headroom.

Each stage is searched on its own (they run one after another, each with its own mesh):
  train       data x fsdp x tensor factorizations of the chip count, grad_accum (micro batch), remat
  generation  the mesh and the pair batch size
  eval        the eval batch size (on the experiment's mesh): the largest whose eval decode and scoring
              kernels fit
Candidates are pruned by an analytic lower bound of their bytes (weights, optimizer state, KV
cache) before anything is compiled, then compiled in the order expected fastest first; a fitting
candidate's time is its roofline (train: the step's loop-scaled estimate; generation: one decode
step's; eval: the decode segment's raw roofline), and the fastest fitting one wins. At most
`budget` candidates per stage are compiled (compiles of a big model take minutes). One JSON line
per compiled candidate, then the plan and the `key=value` overrides that select it.
"""

from __future__ import annotations

import dataclasses
import json
import math

from mixsd_jax.bench import kernels as kernels_lib
from mixsd_jax.bench import memory
from mixsd_jax.bench.estimates import decode_estimates, train_estimates
from mixsd_jax.errors import MixsdError

HEADROOM = 0.9  # a plan fits when every kernel's peak is within 90% of the chip's memory
REMAT_ORDER = ("none", "dots", "full")  # fastest first: less recomputation


def factorizations(n: int, max_tensor: int = 8):
    """(data, fsdp, tensor) with data * fsdp * tensor = n, tensor <= max_tensor (one ICI neighbourhood)."""
    for tensor in (t for t in range(1, min(n, max_tensor) + 1) if n % t == 0):
        rest = n // tensor
        for fsdp in (f for f in range(1, rest + 1) if rest % f == 0):
            yield rest // fsdp, fsdp, tensor


def _param_count(model_cfg) -> int:
    import jax

    from mixsd_jax.models.transformer import param_shapes

    return sum(math.prod(s) for s in jax.tree.leaves(param_shapes(model_cfg), is_leaf=lambda x: isinstance(x, tuple)))


def train_candidates(model_cfg, train, n: int, hbm: int):
    """(mesh sizes, grad_accum, remat) that could fit, fastest expected first."""
    import jax.numpy as jnp

    params = _param_count(model_cfg)
    per_param = jnp.dtype(train.param_dtype).itemsize * 3 + 4  # weights, AdamW m and v, f32 gradient
    out = []
    for data, fsdp, tensor in factorizations(n):
        if params * per_param / (fsdp * tensor) > HEADROOM * hbm:
            continue  # the sharded state alone overflows
        for accum in (a for a in range(1, train.batch_size + 1) if train.batch_size % a == 0):
            if (train.batch_size // accum) % (data * fsdp):
                continue
            for remat in REMAT_ORDER:
                out.append(((data, fsdp, tensor), accum, remat))
    # Fewer micro batches and less recomputation first; then the least tensor parallelism (less traffic).
    return sorted(out, key=lambda c: (c[1], REMAT_ORDER.index(c[2]), c[0][2], c[0][1]))


def _mesh(target, sizes):
    from mixsd_jax.models.sharding import MeshConfig, make_mesh

    return make_mesh(MeshConfig(*sizes), devices=target.devices[: math.prod(sizes)])


def _peak(lines: dict) -> int:
    return max(line["peak_bytes"] for line in lines.values())


def _report(stage: str, candidate: dict, lines: dict, target, seconds) -> dict:
    peak = _peak(lines)
    line = {"bench": "fit", "stage": stage, "candidate": candidate, "peak_bytes": peak,
            "largest": max(lines, key=lambda k: lines[k]["peak_bytes"]),
            "fits": peak <= HEADROOM * target.hbm_bytes, "roofline_s": seconds}
    print(json.dumps(line), flush=True)
    return line


def fit_train(model_cfg, train, target, budget: int):
    from mixsd_jax.bench import cost

    best = None
    for sizes, accum, remat in train_candidates(model_cfg, train, len(target.devices), target.hbm_bytes)[:budget]:
        cand = dataclasses.replace(train, grad_accum=accum, remat=remat)
        mesh = _mesh(target, sizes)
        lines = cost.compile_lines(kernels_lib.train_step(model_cfg, cand, mesh), chip=target.chip,
                                   hbm_bytes=target.hbm_bytes)
        fits = _peak(lines) <= HEADROOM * target.hbm_bytes
        seconds = train_estimates(model_cfg, cand, mesh, target).get("roofline_s") if fits else None
        line = _report("train", {"mesh": sizes, "grad_accum": accum, "remat": remat}, lines, target, seconds)
        if fits and (best is None or (seconds or 0) < (best["roofline_s"] or 0)):
            best = line
    return best


def fit_decode(stage, model_cfg, target, base: kernels_lib.DecodeShapes, meshes, batches, budget: int, *, dtype,
               param_dtype):
    from mixsd_jax.bench import cost
    from mixsd_jax.models.sharding import pad_rows

    best, tried = None, 0
    for sizes in meshes:
        mesh = _mesh(target, sizes)
        for batch in sorted(batches, reverse=True):  # bigger batches first: more tokens per weight read
            if tried >= budget:
                return best
            shapes = dataclasses.replace(base, batch=pad_rows(batch, mesh))
            tried += 1
            lines = cost.compile_lines(kernels_lib.engine(model_cfg, mesh, shapes, dtype=dtype,
                                                          param_dtype=param_dtype), chip=target.chip,
                                       hbm_bytes=target.hbm_bytes)
            fits = _peak(lines) <= HEADROOM * target.hbm_bytes
            seconds = None
            if fits:  # seconds per generated token of the whole batch
                est = decode_estimates(model_cfg, mesh, shapes, target, dtype=dtype, param_dtype=param_dtype)
                seconds = est.get("step_roofline_s", 0.0) / shapes.batch
            line = _report(stage, {"mesh": sizes, "batch_size": batch}, lines, target, seconds)
            if fits:
                if best is None or (seconds or 0) < (best["roofline_s"] or 0):
                    best = line
                break  # a smaller batch on this mesh is slower per token
    return best


EVAL_KERNELS = ("eval_decode", "eval_mc", "eval_kl")


def eval_batches(size: int) -> list[int]:
    """Eval batch sizes to try, largest first: twice the config's, the config's, then halving to 1."""
    out, batch = [2 * size], size
    while batch >= 1:
        out.append(batch)
        batch //= 2
    return out


def fit_eval(model_cfg, plan, target, eval_kernels, budget: int, args):
    """The largest eval batch whose decode and scoring kernels fit (on the experiment's mesh, which
    eval shares with training): fewer weight reads per row. Its time is the decode segment's raw
    roofline per row (loop bodies once: comparable between batch sizes, not a duration)."""
    from mixsd_jax.bench.estimates import kv_bytes_per_device, shard_bytes
    from mixsd_jax.models.sharding import make_mesh, pad_rows

    ev = plan["eval"]
    dtype = ev.get("dtype", "float32")
    mesh = make_mesh(plan["eval_mesh"], devices=target.devices[: memory.mesh_devices(plan["eval_mesh"],
                                                                                     target.fill_devices)])
    weights = shard_bytes(kernels_lib.abstract_params(model_cfg, mesh, dtype))
    prompt_len = getattr(args, "eval_prompt_len", 1024)
    tried = 0
    for batch in eval_batches(int(ev.get("batch_size", 8))):
        shapes = kernels_lib.DecodeShapes(pad_rows(batch, mesh), 1, prompt_len, int(ev.get("max_new_tokens", 256)),
                                          model_cfg.max_position_embeddings)
        cache = kv_bytes_per_device(model_cfg, mesh, shapes.batch, shapes.capacity, dtype)
        if "eval_decode" in eval_kernels and weights + cache > HEADROOM * target.hbm_bytes:
            continue  # the weights and the cache alone overflow
        if tried >= budget:
            return None
        tried += 1
        candidate = {**plan, "eval": {**ev, "batch_size": batch}}
        lines = {line["kernel"]: line for line in memory.plan_lines(
            candidate, target, kernels=eval_kernels, estimates=False, eval_prompt_len=prompt_len,
            eval_row_len=getattr(args, "eval_row_len", 2048), eval_window=getattr(args, "eval_window", 64))}
        fits = _peak(lines) <= HEADROOM * target.hbm_bytes
        segment = lines.get("eval_decode.decode_segment", max(lines.values(), key=lambda x: x["roofline_s"] or 0))
        seconds = (segment["roofline_s"] or 0.0) / shapes.batch if fits else None
        line = _report("eval", {"mesh": tuple(mesh.shape.values()), "batch_size": batch}, lines, target, seconds)
        if fits:
            return line  # the largest batch that fits
    return None


def run_fit(plan: dict, target, kernels, args) -> int:
    if target.chip is None:
        raise MixsdError("--fit: give a TPU --topology to plan for (the roofline needs the chip)")
    with memory.compile_context(target):
        return _run_fit(plan, target, kernels, args)


def _run_fit(plan: dict, target, kernels, args) -> int:
    model_cfg = memory.model_config_for(plan["model"])
    budget = int(getattr(args, "fit_budget", 12))
    n = len(target.devices)
    overrides, chosen = [], {}
    if "train_step" in kernels and "train" in plan:
        best = fit_train(model_cfg, plan["train"], target, budget)
        if best is None:
            raise MixsdError(f"--fit: no train setting fits {target.hbm_bytes} bytes per chip with 10% headroom "
                             f"on {target.topology} (searched {budget} candidates)")
        (d, f, t), c = best["candidate"]["mesh"], best["candidate"]
        overrides += [f"train.mesh={{data: {d}, fsdp: {f}, tensor: {t}}}", f"train.grad_accum={c['grad_accum']}",
                      f"train.remat={c['remat']}"]
        chosen["train"] = best
    gen = plan.get("generation")
    if "generate" in kernels and gen is not None:
        max_new, max_len = int(gen.get("max_new_tokens", 8192)), int(gen.get("max_model_len", 10000))
        base = kernels_lib.DecodeShapes(1, 2, max(max_len - max_new, 1), max_new, max_len)
        size = int(gen.get("batch_size", 32))
        meshes = [(n // t, 1, t) for t in (1, 2, 4, 8) if n % t == 0]
        best = fit_decode("generation", model_cfg, target, base, meshes, {size, max(size // 2, 1), max(size // 4, 1)},
                          budget, dtype=gen.get("dtype", "float32"), param_dtype=gen.get("param_dtype", "float32"))
        if best is None:
            raise MixsdError(f"--fit: no generation mesh / batch size fits {target.hbm_bytes} bytes per chip")
        (d, f, t), c = best["candidate"]["mesh"], best["candidate"]
        overrides += [f"generation.mesh={{data: {d}, fsdp: {f}, tensor: {t}}}", f"generation.batch_size={c['batch_size']}"]
        chosen["generation"] = best
    ev = plan.get("eval")
    eval_kernels = tuple(k for k in kernels if k in EVAL_KERNELS)
    if ev is not None and eval_kernels:
        best = fit_eval(model_cfg, plan, target, eval_kernels, budget, args)
        if best is None:
            raise MixsdError(f"--fit: no eval batch size fits {target.hbm_bytes} bytes per chip with 10% headroom "
                             f"on the experiment's mesh")
        overrides.append(f"eval.batch_size={best['candidate']['batch_size']}")
        chosen["eval"] = best
    line = {"bench": "fit", "topology": target.topology, "hbm_bytes": target.hbm_bytes,
            "plan": {stage: best["candidate"] | {"peak_bytes": best["peak_bytes"], "roofline_s": best["roofline_s"]}
                     for stage, best in chosen.items()},
            "overrides": overrides}
    print(json.dumps(line), flush=True)
    return 0

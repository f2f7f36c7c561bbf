"""`mixsd bench memory`: will each kernel of a config fit a chip? Checked before a pod is rented.

Every kernel is compiled ahead of time at the config's shapes on a simulated CPU mesh of the
config's size (`--xla_force_host_platform_device_count`; the command re-executes itself with it)
from abstract inputs (`jax.ShapeDtypeStruct` with the real shardings: no weights are loaded or
even allocated), and `compiled.memory_analysis()` gives the per-device bytes of the partitioned
program: arguments, outputs, aliased (donated) buffers and temporaries. One JSON line per kernel:

  train_step   the jitted train step (state donated) at batch_size / grad_accum x max_seq_len
  generate     the decode engine's kernels (two sides) at the generation batch and max_model_len
  eval_decode  the engine's kernels (one side) at the eval batch, max_new_tokens and a prompt bucket
               (prefill, insert, decode_segment, grow: the largest one's bytes, each under `engine`)
  eval_mc      the MC / NLL scoring kernel at the eval batch and a row bucket

`peak_bytes` = arguments + outputs - aliased + temporaries, the device memory the program needs
while it runs; `fits` compares it with `chip_bytes` (16 GiB, one TPU v5e chip, by default).
Caveat: this is XLA:CPU's buffer assignment of the same partitioned program. A TPU or GPU compile
fuses differently (usually fewer, smaller temporaries); treat the figure as a close upper bound.

Models: the paper's models are known by shape (models.known_shapes), so no download is needed;
any other model is read from its HF directory's config.json (weights untouched).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

from mixsd_jax import config as config_lib
from mixsd_jax.errors import MixsdError

GIB = 1 << 30
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_REEXEC_ENV = "MIXSD_MEMORY_DEVICES"


# ----------------------------------------------------------------------------- simulated mesh


def mesh_devices(mesh_cfg, default: int) -> int:
    """Devices the mesh needs: the product of its axes, `default` filling a -1 axis."""
    fixed = math.prod(s for s in (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor) if s != -1)
    if -1 in (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor):
        if default % fixed:
            raise MixsdError(f"--devices {default}: not divisible by the mesh's fixed axes product {fixed}")
        return default
    return fixed


def ensure_cpu_devices(n: int, argv: list[str]) -> None:
    """Return when this process has >= n CPU devices; otherwise re-execute the command with n
    simulated ones (XLA reads the flag once, at backend start-up, so it cannot be set later)."""
    import jax

    if jax.default_backend() == "cpu" and jax.device_count() >= n:
        return
    if os.environ.get(_REEXEC_ENV) == str(n):
        raise MixsdError(f"bench memory: could not simulate {n} CPU devices (got {jax.device_count()})")
    env = dict(os.environ)
    flags = re.sub(rf"{_DEVICE_FLAG}=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={n}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[_REEXEC_ENV] = str(n)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mixsd_jax", *argv], env)


# ----------------------------------------------------------------------------- abstract inputs


def _struct(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_params(model_cfg, mesh, dtype: str):
    import jax
    import jax.numpy as jnp

    from mixsd_jax.models.sharding import param_shardings
    from mixsd_jax.models.transformer import param_shapes

    shapes = param_shapes(model_cfg)
    return jax.tree.map(lambda s, sh: _struct(s, jnp.dtype(dtype), sh), shapes, param_shardings(model_cfg, mesh),
                        is_leaf=lambda x: isinstance(x, tuple))


def analyse(kernel: str, lowered, chip_bytes: int, started: float, **info) -> dict:
    """One JSON-ready line from a lowered (or already compiled) kernel: its per-device memory."""
    compiled = lowered.compile() if hasattr(lowered, "compile") else lowered
    mem = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    peak = arg + out - alias + temp
    return {
        "bench": "memory",
        "kernel": kernel,
        **info,
        "argument_bytes": arg,
        "output_bytes": out,
        "alias_bytes": alias,
        "temp_bytes": temp,
        "peak_bytes": peak,
        "peak_gib": round(peak / GIB, 3),
        "chip_bytes": chip_bytes,
        "fits": peak <= chip_bytes,
        "compile_s": round(time.perf_counter() - started, 1),
    }


# ----------------------------------------------------------------------------- kernels


def train_step_memory(model_cfg, train_cfg, mesh, chip_bytes: int) -> dict:
    import jax.numpy as jnp

    from mixsd_jax.train import step as step_lib

    started = time.perf_counter()
    opt = step_lib.OptimConfig.from_train_config(train_cfg, total_steps=1000)
    options = step_lib.StepOptions.from_train_config(train_cfg)
    tx = step_lib.make_optimizer(opt)
    shardings = step_lib.state_shardings(model_cfg, tx, mesh)
    state = step_lib.abstract_state(model_cfg, tx, shardings, train_cfg.param_dtype)
    A, M, T = train_cfg.grad_accum, train_cfg.micro_batch, train_cfg.max_seq_len
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if M % shards:
        raise MixsdError(f"config key 'train.batch_size': the micro batch ({train_cfg.batch_size} / grad_accum {A} = {M}) "
                         f"must be divisible by the mesh's data x fsdp = {shards} devices")
    batch = {key: _struct((A, M, T), jnp.float32 if key == "loss_mask" else jnp.int32, sh)
             for key, sh in step_lib.batch_shardings(mesh).items()}
    step_fn = step_lib.jit_train_step(model_cfg, opt, mesh, train_cfg.compute_dtype, options)
    return analyse("train_step", step_fn.lower(state, batch), chip_bytes, started,
                   shapes={"grad_accum": A, "micro_batch": M, "seq_len": T},
                   param_dtype=train_cfg.param_dtype, compute_dtype=train_cfg.compute_dtype,
                   remat=options.remat, loss_chunk=options.loss_chunk)


ENGINE_BLOCK = 512  # the engine's attention block on an accelerator (engine.Engine: 128 only on a CPU)


def _with_shardings(structs, shardings):
    import jax

    return jax.tree.map(lambda s, sh: _struct(s.shape, s.dtype, sh), structs, shardings)


def decode_memory(kernel: str, model_cfg, mesh, chip_bytes: int, *, sides: int, batch: int, prompt_len: int,
                  max_new_tokens: int, max_model_len: int, dtype: str, param_dtype: str, topk: int = 64,
                  segment_steps: int = 16, block: int = ENGINE_BLOCK) -> dict:
    """The continuous-batching engine's compiled kernels (sampling/segments.py) at these shapes.

    The Engine itself sizes everything (its batch rounding, its cache capacity rule), with no
    weights: a full batch of `prompt_len`-token prompts, so the cache reaches its ceiling
    min(max_model_len, prompt + max_new_tokens) + one segment, in whole blocks. Compiled:
      prefill         one side's prompts [B, bucket(prompt_len)] (split over the batch axes, as the engine puts them)
      insert          every side's prefill output into the state at full capacity (state donated)
      decode_segment  `segment_steps` steps on the state at full capacity (state donated)
      grow            the last cache copy-up, from the previous power-of-two blocks to full capacity
    The line carries the largest one's bytes (`largest`) and every kernel's under `engine`.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mixsd_jax.models.sharding import batch_sharding, replicated
    from mixsd_jax.sampling import segments
    from mixsd_jax.sampling.engine import Engine, _pow2_at_least
    from mixsd_jax.sampling.runner import bucket_length
    from mixsd_jax.sampling.strategies import Sampler

    started = time.perf_counter()
    engine = Engine(None, model_cfg, sampler=Sampler(1.0, topk), sides=sides, stop_ids=[0],
                    max_new_tokens=max_new_tokens, max_model_len=max_model_len, batch_size=batch, seed=0,
                    dtype=dtype, mesh=mesh, segment_steps=segment_steps, block=block)
    spec, B = engine.spec, engine.batch_size
    need = min(max_model_len, prompt_len + max_new_tokens) + segment_steps + 1  # every row at its ceiling
    capacity = engine._capacity_for(need, prompt_len)
    prev_capacity = block * (_pow2_at_least(capacity // block) // 2)
    width = bucket_length(prompt_len)
    rep = replicated(mesh)
    params = abstract_params(model_cfg, mesh, param_dtype)

    def state_at(cap):
        fn = segments.init_state.lower(spec=spec, batch=B, capacity=cap).compile()
        shapes = jax.eval_shape(lambda: segments.init_state(spec=spec, batch=B, capacity=cap))
        return _with_shardings(shapes, fn.output_shardings)

    state = state_at(capacity)
    tokens = _struct((B, width), jnp.int32, batch_sharding(mesh, 2))
    lens = _struct((B,), jnp.int32, batch_sharding(mesh, 1))
    prefill = segments.prefill.lower(params, tokens, lens, spec=spec).compile()
    prefill_out = _with_shardings(jax.eval_shape(lambda: segments.prefill(params, tokens, lens, spec=spec)),
                                  prefill.output_shardings)
    side_args = tuple((*prefill_out, lens) for _ in range(sides))
    lowered = {
        "prefill": prefill,
        "insert": segments.insert.lower(state, side_args, _struct((B,), jnp.int32, rep),
                                        _struct((B, 3), jnp.uint32, rep), _struct((), jnp.int32, rep), spec=spec),
        "decode_segment": segments.decode_segment.lower(params, state, _struct((), jnp.float32, rep),
                                                        _struct((2,), jnp.int32, rep), _struct((), jnp.int32, rep),
                                                        spec=spec),
    }
    if prev_capacity >= block:
        lowered["grow"] = segments.grow.lower(state_at(prev_capacity), spec=spec, capacity=capacity)
    lines = {name: analyse(name, low, chip_bytes, time.perf_counter()) for name, low in lowered.items()}
    engine_info = {name: {k: line[k] for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                                               "peak_bytes", "peak_gib", "fits")} for name, line in lines.items()}
    largest = max(lines, key=lambda name: lines[name]["peak_bytes"])
    top = lines[largest]
    cache_bytes = 2 * int(np.prod(state["cache_k"].sharding.shard_shape(state["cache_k"].shape))) \
        * jnp.dtype(dtype).itemsize
    return {
        **{k: v for k, v in top.items() if k not in ("kernel", "compile_s")},
        "kernel": kernel,
        "largest": largest,
        "shapes": {"batch": B, "sides": sides, "prompt_len": prompt_len, "prompt_width": width,
                   "max_new_tokens": max_new_tokens, "cache_slots": capacity, "grow_from": prev_capacity,
                   "segment_steps": segment_steps, "block": block},
        "kv_cache_bytes_per_device": cache_bytes,
        "engine": engine_info,
        "param_dtype": param_dtype, "compute_dtype": dtype,
        "compile_s": round(time.perf_counter() - started, 1),
    }


def mc_memory(model_cfg, mesh, chip_bytes: int, *, batch: int, row_len: int, window: int, dtype: str,
              param_dtype: str) -> dict:
    """The eval scoring kernel (MC log-likelihoods, NLL) on a [batch, row_len] bucket."""
    import jax.numpy as jnp

    from mixsd_jax.eval.mc import window_logprobs
    from mixsd_jax.models.sharding import batch_sharding

    started = time.perf_counter()
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = -(-batch // shards) * shards
    params = abstract_params(model_cfg, mesh, param_dtype)
    rows = _struct((batch, row_len), jnp.int32, batch_sharding(mesh, 2))
    starts = _struct((batch,), jnp.int32, batch_sharding(mesh, 1))
    targets = _struct((batch, window), jnp.int32, batch_sharding(mesh, 2))
    lowered = window_logprobs.lower(params, rows, rows, starts, targets, cfg=model_cfg, dtype=dtype)
    return analyse("eval_mc", lowered, chip_bytes, started, shapes={"batch": batch, "row_len": row_len,
                                                                     "window": window},
                   param_dtype=param_dtype, compute_dtype=dtype)


# ----------------------------------------------------------------------------- configs


def model_config_for(model: str):
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.known_shapes import known_model_config
    from mixsd_jax.models.registry import resolve_model

    known = known_model_config(str(model))
    return known if known is not None else ModelConfig.from_hf_dir(resolve_model(model))


def load_plan_config(path: str, overrides) -> dict:
    """{model, mesh, train, generation, eval} from an experiment config, or from a train config
    (a YAML of TrainConfig keys: only the train step is planned)."""
    from mixsd_jax.models.sharding import MeshConfig
    from mixsd_jax.train.config import TrainConfig

    raw = config_lib.read_yaml(path)
    if any(key in raw for key in ("generation", "train", "eval", "methods", "corpus")):
        from mixsd_jax.pipeline.config import load_experiment

        exp = load_experiment(path, overrides)
        if exp.models:  # a scaling study: the model `model=NAME` picks, with its own sections
            from mixsd_jax.pipeline.study import chosen_model_config

            exp = chosen_model_config(exp)

        def section_mesh(section: dict) -> MeshConfig:
            if "mesh" in section:
                return config_lib.from_dict(MeshConfig, section["mesh"], prefix="mesh.")
            return exp.mesh

        train = config_lib.from_dict(TrainConfig, {k: v for k, v in exp.train.items() if k != "mesh"}, prefix="train.")
        return {"model": exp.model, "train": train, "train_mesh": section_mesh(exp.train),
                "generation": exp.generation, "generation_mesh": section_mesh(exp.generation),
                "eval": exp.eval, "eval_mesh": exp.mesh}
    train = config_lib.load(TrainConfig, path, overrides)
    return {"model": train.model, "train": train, "train_mesh": train.mesh}


def plan_lines(plan: dict, *, devices: int, chip_bytes: int, kernels, eval_prompt_len: int, eval_row_len: int,
               eval_window: int):
    """Yield one result dict per kernel (compiling each in turn)."""
    import jax

    from mixsd_jax.models.sharding import make_mesh

    model_cfg = model_config_for(plan["model"])

    def mesh_of(key):
        mesh_cfg = plan[key]
        mesh = make_mesh(mesh_cfg, devices=jax.devices()[: mesh_devices(mesh_cfg, devices)])
        return mesh, dict(mesh.shape)

    common = {"model": str(plan["model"])}
    if "train_step" in kernels and "train" in plan:
        mesh, shape = mesh_of("train_mesh")
        yield train_step_memory(model_cfg, plan["train"], mesh, chip_bytes) | {"mesh": shape, **common}
    gen = plan.get("generation")
    if "generate" in kernels and gen is not None:
        mesh, shape = mesh_of("generation_mesh")
        max_new = int(gen.get("max_new_tokens", 8192))
        max_len = int(gen.get("max_model_len", 10000))
        # Worst case: the longest prompt the length limit allows, so the cache has max_model_len slots.
        yield decode_memory("generate", model_cfg, mesh, chip_bytes, sides=2, batch=int(gen.get("batch_size", 32)),
                            prompt_len=max(max_len - max_new, 1), max_new_tokens=max_new, max_model_len=max_len,
                            dtype=gen.get("dtype", "float32"), param_dtype=gen.get("param_dtype", "float32"),
                            topk=int(gen.get("topk", 64))) | {"mesh": shape, **common}
    ev = plan.get("eval")
    if ev is not None and ("eval_decode" in kernels or "eval_mc" in kernels):
        mesh, shape = mesh_of("eval_mesh")
        # Eval computes in its dtype; its weights are held in bf16 when it computes in bf16.
        dtype = ev.get("dtype", gen.get("dtype", "float32") if gen else "float32")
        batch = int(ev.get("batch_size", 8))
        if "eval_decode" in kernels:
            yield decode_memory("eval_decode", model_cfg, mesh, chip_bytes, sides=1, batch=batch,
                                prompt_len=eval_prompt_len, max_new_tokens=int(ev.get("max_new_tokens", 256)),
                                max_model_len=model_cfg.max_position_embeddings, dtype=dtype,
                                param_dtype=dtype) | {"mesh": shape, **common}
        if "eval_mc" in kernels:
            yield mc_memory(model_cfg, mesh, chip_bytes, batch=batch, row_len=eval_row_len, window=eval_window,
                            dtype=dtype, param_dtype=dtype) | {"mesh": shape, **common}


def parse_bytes(text: str) -> int:
    """`17179869184`, `16GiB`, `80GB`, `95 GiB` -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(|B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)\s*", str(text))
    if not match:
        raise MixsdError(f"--chip-bytes {text!r}: expected a byte count such as 17179869184, 16GiB or 80GB")
    scale = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[match.group(2)]
    return int(float(match.group(1)) * scale)


KERNELS = ("train_step", "generate", "eval_decode", "eval_mc")


def run(args, argv: list[str]) -> int:
    from mixsd_jax.models.sharding import MeshConfig

    if args.config is None:
        raise MixsdError("bench memory: --config FILE is required (an experiment or a train config)")
    kernels = tuple(args.kernels.split(",")) if args.kernels else KERNELS
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise MixsdError(f"--kernels: unknown kernel {unknown[0]!r} (known: {', '.join(KERNELS)})")
    plan = load_plan_config(args.config, args.overrides)
    meshes = [plan[k] for k in ("train_mesh", "generation_mesh", "eval_mesh") if isinstance(plan.get(k), MeshConfig)]
    ensure_cpu_devices(max(mesh_devices(m, args.devices) for m in meshes), argv)
    chip = parse_bytes(args.chip_bytes)
    for line in plan_lines(plan, devices=args.devices, chip_bytes=chip, kernels=kernels,
                           eval_prompt_len=args.eval_prompt_len, eval_row_len=args.eval_row_len,
                           eval_window=args.eval_window):
        print(json.dumps({"config": str(args.config), **line}), flush=True)
    return 0

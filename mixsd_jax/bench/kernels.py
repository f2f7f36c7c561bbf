"""Every kernel a config runs, lowered at the config's shapes from abstract inputs (no weights, no
device buffers), for whichever devices the mesh holds: simulated CPU ones or a TPU topology's.

Each builder returns {kernel name: jax Lowered}; `bench.memory` compiles and measures them.
  train_step / opsd_step     the jitted update (state donated), SFT NLL or OPSD's teacher + student loss
  prefill, insert,           the decode engine's pieces (sampling/segments.py) with `sides` rows per
  decode_segment, grow       record: 2 for MixSD generation, 1 for eval / selection / OPSD rollouts
  eval_mc, eval_kl           eval scoring: MC / NLL log-likelihoods, KL(base || tuned)
  export_gather              the HF export's largest gather: one tensor (one layer's slice) whole on every device
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mixsd_jax.errors import MixsdError


def struct(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_params(model_cfg, mesh, dtype: str):
    import jax
    import jax.numpy as jnp

    from mixsd_jax.models.sharding import param_shardings
    from mixsd_jax.models.transformer import param_shapes

    return jax.tree.map(lambda s, sh: struct(s, jnp.dtype(dtype), sh), param_shapes(model_cfg),
                        param_shardings(model_cfg, mesh), is_leaf=lambda x: isinstance(x, tuple))


def _check_micro(train_cfg, mesh, key: str = "train"):
    A, M = train_cfg.grad_accum, train_cfg.micro_batch
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if M % shards:
        raise MixsdError(f"config key '{key}.batch_size': the micro batch ({train_cfg.batch_size} / grad_accum {A} "
                         f"= {M}) must be divisible by the mesh's data x fsdp = {shards} devices")


def train_step(model_cfg, train_cfg, mesh, *, opsd: bool = False) -> dict:
    """The SFT step (or with `opsd`, the OPSD step: student and frozen-teacher forwards, top-k loss)."""
    import jax.numpy as jnp

    from mixsd_jax.train import step as step_lib

    _check_micro(train_cfg, mesh, "opsd" if opsd else "train")
    opt = step_lib.OptimConfig.from_train_config(train_cfg, total_steps=1000)
    options = step_lib.StepOptions.from_train_config(train_cfg)
    tx = step_lib.make_optimizer(opt)
    state = step_lib.abstract_state(model_cfg, tx, step_lib.state_shardings(model_cfg, tx, mesh),
                                    train_cfg.param_dtype)
    A, M, T = train_cfg.grad_accum, train_cfg.micro_batch, train_cfg.max_seq_len
    if not opsd:
        batch = {key: struct((A, M, T), jnp.float32 if key == "loss_mask" else jnp.int32, sh)
                 for key, sh in step_lib.batch_shardings(mesh).items()}
        dtype = train_cfg.compute_dtype_on(step_lib.platform_of(mesh))
        fn = step_lib.jit_train_step(model_cfg, opt, mesh, dtype, options)
        return {"train_step": fn.lower(state, batch)}
    from mixsd_jax.train.opsd import OPSD_KEYS, OpsdLoss

    o = train_cfg.opsd
    loss = OpsdLoss(o.divergence, o.topk, o.mixed_kl_weight, frozen_teacher=o.teacher == "base", chunk=o.loss_chunk)
    # The padded worst case: student and teacher rows at max_seq_len, responses at max_new_tokens.
    R = min(o.max_new_tokens, T)
    R = -(-R // min(o.loss_chunk, R)) * min(o.loss_chunk, R)
    widths = dict.fromkeys(OPSD_KEYS[:6], T) | dict.fromkeys(OPSD_KEYS[6:], R)
    shardings = step_lib.batch_shardings(mesh, OPSD_KEYS)
    batch = {key: struct((A, M, widths[key]), jnp.float32 if key == "loss_mask" else jnp.int32, shardings[key])
             for key in OPSD_KEYS}
    dtype = train_cfg.compute_dtype_on(step_lib.platform_of(mesh))
    fn = step_lib.jit_train_step(model_cfg, opt, mesh, dtype, options, loss=loss)
    teacher = (abstract_params(model_cfg, mesh, train_cfg.param_dtype),) if loss.frozen_teacher else ()
    return {"opsd_step": fn.lower(state, batch, *teacher)}


@dataclasses.dataclass(frozen=True)
class DecodeShapes:
    """A full batch of the longest prompts, the cache at its ceiling (every row can reach it)."""

    batch: int  # records (slots), rounded up to whole rows per batch shard
    sides: int
    prompt_len: int
    max_new_tokens: int
    max_model_len: int
    segment_steps: int = 16
    block: int = 512  # the engine's attention block on an accelerator

    @property
    def capacity(self) -> int:
        # The engine's rule at the ceiling: min(max_model_len, prompt + new) + one segment, in whole blocks.
        need = min(self.max_model_len, self.prompt_len + self.max_new_tokens) + self.segment_steps + 1
        return self.block * -(-need // self.block)

    @property
    def grow_from(self) -> int:
        """The capacity of the last copy-up before the ceiling (power-of-two blocks), 0 if none."""
        blocks = self.capacity // self.block
        prev = 1 << max(0, blocks - 1).bit_length()
        return self.block * (prev // 2) if prev // 2 >= 1 and self.block * (prev // 2) < self.capacity else 0


def engine_spec(model_cfg, mesh, shapes: DecodeShapes, dtype: str, topk: int):
    from mixsd_jax.sampling import segments
    from mixsd_jax.sampling.strategies import Sampler

    return segments.EngineSpec(model_cfg, Sampler(1.0, topk), shapes.sides, shapes.max_new_tokens,
                               shapes.max_model_len, batch_size=shapes.batch, dtype=dtype, mesh=mesh,
                               segment_steps=shapes.segment_steps, block=shapes.block)


def engine(model_cfg, mesh, shapes: DecodeShapes, *, dtype: str, param_dtype: str, topk: int = 64,
           prefix: str = "") -> dict:
    """prefill (one side's prompts, split over the batch axes), insert (every side into the state
    at full capacity, donated), decode_segment (`segment_steps` steps, donated), grow (the last
    copy-up to full capacity)."""
    import jax
    import jax.numpy as jnp

    from mixsd_jax.models.sharding import batch_sharding, replicated
    from mixsd_jax.sampling import segments
    from mixsd_jax.sampling.work import bucket_length

    spec = engine_spec(model_cfg, mesh, shapes, dtype, topk)
    need = min(shapes.max_model_len, shapes.prompt_len + shapes.max_new_tokens) + shapes.segment_steps + 1
    if segments.capacity_for(spec, need, shapes.prompt_len) != shapes.capacity:  # the engine's rule changed
        raise AssertionError(f"DecodeShapes.capacity {shapes.capacity} is not the engine's "
                             f"{segments.capacity_for(spec, need, shapes.prompt_len)}")
    B, rep = shapes.batch, replicated(mesh)
    params = abstract_params(model_cfg, mesh, param_dtype)
    state = _state_at(spec, B, shapes.capacity)
    tokens = struct((B, bucket_length(shapes.prompt_len)), jnp.int32, batch_sharding(mesh, 2))
    lens = struct((B,), jnp.int32, batch_sharding(mesh, 1))
    prefill = segments.prefill.lower(params, tokens, lens, spec=spec)
    out = _with_shardings(jax.eval_shape(lambda: segments.prefill(params, tokens, lens, spec=spec)),
                          prefill.compile().output_shardings)
    sides = tuple((*out, lens) for _ in range(shapes.sides))
    lowered = {
        "prefill": prefill,
        "insert": segments.insert.lower(state, sides, struct((B,), jnp.int32, rep), struct((B, 3), jnp.uint32, rep),
                                        struct((), jnp.int32, rep), spec=spec),
        "decode_segment": decode_segment(model_cfg, mesh, shapes, dtype=dtype, param_dtype=param_dtype, topk=topk),
    }
    if shapes.grow_from:
        lowered["grow"] = segments.grow.lower(_state_at(spec, B, shapes.grow_from), spec=spec, capacity=shapes.capacity)
    return {prefix + name: low for name, low in lowered.items()}


def decode_segment(model_cfg, mesh, shapes: DecodeShapes, *, dtype: str, param_dtype: str, topk: int = 64):
    """The engine's decode segment on the state at `shapes.capacity` (lowered)."""
    import jax.numpy as jnp

    from mixsd_jax.models.sharding import replicated
    from mixsd_jax.sampling import segments

    spec = engine_spec(model_cfg, mesh, shapes, dtype, topk)
    rep = replicated(mesh)
    return segments.decode_segment.lower(abstract_params(model_cfg, mesh, param_dtype),
                                         _state_at(spec, shapes.batch, shapes.capacity), struct((), jnp.float32, rep),
                                         struct((2,), jnp.int32, rep), struct((), jnp.int32, rep), spec=spec)


def _with_shardings(structs, shardings):
    import jax

    return jax.tree.map(lambda s, sh: struct(s.shape, s.dtype, sh), structs, shardings)


def _state_at(spec, batch: int, capacity: int):
    """The engine state's abstract arrays with the shardings init_state gives them (read from the
    engine's layout, not from compiling init_state: a state too big for the chip must still be
    measured by the kernels that use it)."""
    import jax

    from mixsd_jax.sampling import segments

    state = jax.eval_shape(lambda: segments.init_state(spec=spec, batch=batch, capacity=capacity))
    return _with_shardings(state, segments.state_shardings(state, spec))


def eval_scoring(model_cfg, mesh, *, batch: int, row_len: int, window: int, dtype: str, kl: bool,
                 kl_batch: int | None = None) -> dict:
    """MC / NLL window log-likelihoods, and KL(base || tuned) over whole rows (two weight sets) on
    `kl_batch` rows (default `batch`)."""
    import jax.numpy as jnp

    from mixsd_jax.eval.mc import window_logprobs
    from mixsd_jax.models.sharding import batch_sharding

    params = abstract_params(model_cfg, mesh, dtype)
    rows = struct((batch, row_len), jnp.int32, batch_sharding(mesh, 2))
    starts = struct((batch,), jnp.int32, batch_sharding(mesh, 1))
    targets = struct((batch, window), jnp.int32, batch_sharding(mesh, 2))
    out = {"eval_mc": window_logprobs.lower(params, rows, rows, starts, targets, cfg=model_cfg, dtype=dtype)}
    if kl:
        from mixsd_jax.eval.analyses import kl_per_position

        kl_rows = struct((kl_batch or batch, row_len), jnp.int32, batch_sharding(mesh, 2))
        out["eval_kl"] = kl_per_position.lower(params, params, kl_rows, kl_rows, cfg=model_cfg, dtype=dtype)
    return out


def export_gather(model_cfg, mesh, *, param_dtype: str, export_dtype: str) -> dict:
    """The export's largest gather: the HF export (models.checkpoint.export_hf) gathers one tensor at
    a time, a stacked layer parameter one layer at a time, so a device holds the sharded parameters
    plus the largest single gathered tensor, cast to the export dtype."""
    import jax
    import jax.numpy as jnp

    from mixsd_jax.models.sharding import replicated

    params = abstract_params(model_cfg, mesh, param_dtype)
    itemsize = jnp.dtype(param_dtype).itemsize
    candidates = [(int(np.prod(x.shape)), (name, None)) for name, x in params.items() if name != "layers"]
    candidates += [(int(np.prod(x.shape[1:])), ("layers", name)) for name, x in params["layers"].items()]
    _, (top, layer_name) = max(candidates, key=lambda c: c[0] * itemsize)

    def largest(p):
        x = p[top] if layer_name is None else p[top][layer_name][0]
        return x.astype(jnp.dtype(export_dtype))

    cast = jax.jit(largest, out_shardings=replicated(mesh), keep_unused=True)  # the whole sharded state is resident
    return {"export_gather": cast.lower(params)}


def decode_head(model_cfg, mesh, shapes: DecodeShapes, *, dtype: str, param_dtype: str, topk: int = 64):
    """What a decode step does outside its layer scan: the LM head on one row per record and the
    draw (lowered). Its cost separates the per-layer part of the step (bench.estimates)."""
    import jax
    import jax.numpy as jnp

    from mixsd_jax.models import transformer
    from mixsd_jax.models.sharding import batch_sharding

    spec = engine_spec(model_cfg, mesh, shapes, dtype, topk)

    @jax.jit
    def head(params, last_BxD, keys_Bx2):
        logits = transformer.lm_logits(params, model_cfg, last_BxD, dtype=jnp.dtype(dtype))
        return spec.sampler.next_tokens(logits, jax.random.wrap_key_data(keys_Bx2))

    B = shapes.batch
    return head.lower(abstract_params(model_cfg, mesh, param_dtype),
                      struct((B, model_cfg.hidden_size), jnp.dtype(dtype), batch_sharding(mesh, 2)),
                      struct((B, 2), jnp.uint32, batch_sharding(mesh, 2)))

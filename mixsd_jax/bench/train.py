"""`mixsd bench train`: our jitted train step against a transformers PyTorch AdamW step.

Both sides train the same model on the same random batch (B x T tokens, every position a target)
with AdamW and global-norm clipping, in the same process. The first step of each (compilation,
allocator warm-up) is not timed; then their steps alternate and each side's median step time
gives its tokens/s (B x T input tokens per step), so load changes on a shared machine affect
both alike.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from mixsd_jax.bench import machine

# Dense bf16 peak used for MFU when none is given: the H200 figure measured on our GPU machine.
DEFAULT_PEAK_TFLOPS = {"gpu": 790.0}


def synthetic_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    shape = (1, batch_size, seq_len)
    return {
        "tokens": ids[None, :, :-1],
        "targets": ids[None, :, 1:],
        "loss_mask": np.ones(shape, np.float32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
    }


def load_params(model_dir, mesh, random_init: bool = False):
    """(ModelConfig, parameters on `mesh`): the directory's weights, or random ones from its config.json."""
    import jax

    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.sharding import param_shardings
    from mixsd_jax.models.transformer import init_params

    if not random_init:
        return load_hf(model_dir, mesh=mesh)
    cfg = ModelConfig.from_hf_dir(model_dir)
    return cfg, jax.jit(lambda key: init_params(cfg, key), out_shardings=param_shardings(cfg, mesh))(jax.random.key(0))


def ours_stepper(model_dir, batch_size: int, seq_len: int, compute_dtype: str, random_init: bool = False,
                 options=None, more_dtypes: tuple[str, ...] = ()):
    """(one_step() that runs our train step to completion, ModelConfig); with `more_dtypes`, a
    dict of one_step() by compute dtype instead (`compute_dtype` first), all advancing one state."""
    import jax

    from mixsd_jax.models.sharding import MeshConfig, make_mesh
    from mixsd_jax.train import step as step_lib

    mesh = make_mesh(MeshConfig())
    cfg, params = load_params(model_dir, mesh, random_init)
    opt = step_lib.OptimConfig(lr=1e-5, total_steps=1000)
    tx = step_lib.make_optimizer(opt)
    shardings = step_lib.state_shardings(cfg, tx, mesh)
    holder = {"state": step_lib.init_state(params, tx, shardings)}
    del params
    batch = step_lib.device_batch(synthetic_batch(cfg.vocab_size, batch_size, seq_len), mesh)

    def stepper(dtype):
        step_fn = step_lib.jit_train_step(cfg, opt, mesh, dtype, options or step_lib.StepOptions())

        def one_step():
            holder["state"], metrics = step_fn(holder["state"], batch)
            jax.block_until_ready((holder["state"], metrics))

        return one_step

    if not more_dtypes:
        return stepper(compute_dtype), cfg
    return {dtype: stepper(dtype) for dtype in (compute_dtype, *more_dtypes)}, cfg


def torch_stepper(model_dir, batch_size: int, seq_len: int, compute_dtype: str, random_init: bool = False,
                  more_dtypes: tuple[str, ...] = ()):
    """one_step() running a transformers forward/backward + clip + AdamW step to completion, in f32
    or under bf16 autocast; with `more_dtypes`, a dict of them by dtype sharing one model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if random_init:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    batch = synthetic_batch(model.config.vocab_size, batch_size, seq_len)
    inputs = torch.from_numpy(batch["tokens"][0]).long().to(device)
    labels = torch.from_numpy(batch["targets"][0]).long().to(device)

    def stepper(dtype):
        def one_step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                logits = model(input_ids=inputs).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # waits for the device
            if device == "cuda":
                torch.cuda.synchronize()

        return one_step

    if not more_dtypes:
        return stepper(compute_dtype)
    return {dtype: stepper(dtype) for dtype in (compute_dtype, *more_dtypes)}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def step_matmuls(cfg, tokens: int) -> list[tuple[tuple[int, int, int], int]]:
    """The weight matmuls of one forward pass as ((rows, in, out), count): what the step's
    matmul FLOPs are made of (the backward pass runs each shape twice more, transposed)."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    shapes = {}
    for shape in ((tokens, D, cfg.q_dim), (tokens, D, cfg.kv_dim), (tokens, D, cfg.kv_dim), (tokens, cfg.q_dim, D),
                  (tokens, D, F), (tokens, D, F), (tokens, F, D)):
        shapes[shape] = shapes.get(shape, 0) + L
    shapes[(tokens, D, cfg.vocab_size)] = 1
    return list(shapes.items())


def matmul_gflops(cfg, tokens: int, dtype: str, reps: int = 3) -> float:
    """GFLOP/s of plain `jax.jit` matmuls on the step's shapes (f32 accumulation), weighted by how
    often the step runs each shape: the rate XLA itself reaches here, measured in the same run."""
    import jax
    import jax.numpy as jnp

    mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    flops = seconds = 0.0
    for (n, k, m), count in step_matmuls(cfg, tokens):
        a = jnp.ones((n, k), dtype)
        b = jnp.ones((k, m), dtype)
        jax.block_until_ready(mm(a, b))
        t = float(np.median([_timed(lambda: jax.block_until_ready(mm(a, b))) for _ in range(reps)]))
        flops += 2.0 * n * k * m * count
        seconds += t * count
    return flops / seconds / 1e9


def bench_train(
    model: str,
    *,
    batch_size: int = 8,
    seq_len: int = 128,
    steps: int = 5,
    compute_dtype: str = "float32",
    torch_compare: bool = True,
    random_init: bool = False,
    peak_tflops: float | None = None,
    options=None,
) -> dict:
    import jax

    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.train.step import flops_per_token

    from mixsd_jax.train.precision import resolve_compute_dtype

    model_dir = resolve_model(model)
    asked_dtype, compute_dtype = compute_dtype, resolve_compute_dtype(compute_dtype, jax.default_backend())
    ours_step, cfg = ours_stepper(model_dir, batch_size, seq_len, compute_dtype, random_init, options)
    compile_s = _timed(ours_step)
    torch_step = None
    if torch_compare:
        torch_step = torch_stepper(model_dir, batch_size, seq_len, compute_dtype, random_init)
        torch_step()
    # Interleaved, so a change in machine load during the run hits both sides alike; medians.
    load_before = machine.load()
    ours_s, torch_s = [], []
    for _ in range(steps):
        ours_s.append(_timed(ours_step))
        if torch_step is not None:
            torch_s.append(_timed(torch_step))
    tokens = batch_size * seq_len
    ours = tokens / float(np.median(ours_s))
    flops = flops_per_token(cfg, seq_len)
    result: dict = {
        "model": str(model),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "compute_dtype": compute_dtype,
        **({"compute_dtype_asked": asked_dtype} if asked_dtype != compute_dtype else {}),
        "step_options": None if options is None else dataclasses.asdict(options),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "ours_tokens_per_s": round(ours, 2),
        "ours_step_s": [round(t, 4) for t in ours_s],
        "ours_first_step_s": round(compile_s, 2),
        "gflop_per_token": round(flops / 1e9, 4),
        "achieved_gflops": round(ours * flops / 1e9, 2),
    }
    if torch_step is not None:
        theirs = tokens / float(np.median(torch_s))
        # Per interleaved pair: both sides under the same momentary load.
        ratios = [t / o for o, t in zip(ours_s, torch_s)]
        result.update(
            torch_tokens_per_s=round(theirs, 2),
            torch_step_s=[round(t, 4) for t in torch_s],
            ratio=round(float(np.median(ratios)), 3),
            ratio_min=round(min(ratios), 3),
            ratio_max=round(max(ratios), 3),
            ratio_of_medians=round(ours / theirs, 3),
        )
    result["matmul_gflops"] = round(matmul_gflops(cfg, tokens, compute_dtype), 2)
    result["achieved_over_matmul"] = round(result["achieved_gflops"] / result["matmul_gflops"], 3)
    result["tflops_per_s"] = round(ours * flops / 1e12, 3)
    peak = peak_tflops or DEFAULT_PEAK_TFLOPS.get(jax.default_backend())
    if peak:
        result["peak_tflops"] = peak
        result["mfu"] = round(ours * flops / (peak * 1e12 * jax.device_count()), 4)
    result.update(machine.report(load_before))
    return result


def _side_summary(tokens: int, step_s: list[float]) -> dict:
    rates = [tokens / t for t in step_s]
    return {"tokens_per_s": round(float(np.median(rates)), 2), "tokens_per_s_min": round(min(rates), 2),
            "tokens_per_s_max": round(max(rates), 2), "step_s": [round(t, 4) for t in step_s]}


def _pair_ratio(num_s: list[float], den_s: list[float]) -> dict:
    """Speed of the `den` side over the `num` side per interleaved round (num time / den time)."""
    ratios = [n / d for n, d in zip(num_s, den_s)]
    return {"median": round(float(np.median(ratios)), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


def compare_train(
    model: str,
    *,
    batch_size: int = 8,
    seq_len: int = 128,
    rounds: int = 5,
    compute_dtype: str = "auto",
    random_init: bool = False,
    options=None,
) -> dict:
    """Our step in f32 and in `compute_dtype` ("auto" resolved for this machine) against the
    PyTorch step in f32 and under bf16 autocast, all four interleaved round by round (each side's
    first step untimed). `ratio` is our best side over PyTorch's best side (by median tokens/s),
    taken per round."""
    import jax

    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.train.precision import resolve_compute_dtype

    model_dir = resolve_model(model)
    ours_dtype = resolve_compute_dtype(compute_dtype, jax.default_backend())
    dtypes = ("float32",) if ours_dtype == "float32" else ("float32", ours_dtype)
    ours, _ = ours_stepper(model_dir, batch_size, seq_len, dtypes[0], random_init, options, dtypes[1:])
    theirs = torch_stepper(model_dir, batch_size, seq_len, "float32", random_init, ("bfloat16",))
    sides = {**{f"ours_{d}": fn for d, fn in ours.items()}, **{f"torch_{d}": fn for d, fn in theirs.items()}}
    first_step_s = {name: round(_timed(fn), 2) for name, fn in sides.items()}
    load_before = machine.load()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            times[name].append(_timed(fn))
    tokens = batch_size * seq_len
    summary = {name: _side_summary(tokens, t) for name, t in times.items()}

    def best(prefix):
        return max((n for n in summary if n.startswith(prefix)), key=lambda n: summary[n]["tokens_per_s"])

    ours_best, torch_best = best("ours_"), best("torch_")
    result = {
        "model": str(model), "batch_size": batch_size, "seq_len": seq_len, "rounds": rounds,
        "compute_dtype_asked": compute_dtype, "compute_dtype": ours_dtype,
        "step_options": None if options is None else dataclasses.asdict(options),
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "first_step_s": first_step_s, "sides": summary,
        "ours_best": ours_best, "torch_best": torch_best,
        "ratio": _pair_ratio(times[torch_best], times[ours_best]),
    }
    if len(dtypes) > 1:
        result[f"ours_{ours_dtype}_over_ours_float32"] = _pair_ratio(times["ours_float32"], times[f"ours_{ours_dtype}"])
    result.update(machine.report(load_before))
    return result

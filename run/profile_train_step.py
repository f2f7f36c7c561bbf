"""Where the train step's time goes: its parts timed alone, interleaved, on one device.

  python run/profile_train_step.py [--model smollm2-135m-instruct] [--batch 8] [--seq 128] [--dtype float32]

Parts (each its own jitted function on the same inputs; medians of interleaved repetitions, so a
change of machine load hits every part alike):
  step          the whole jitted train step (state donated), as `mixsd bench train` times it
  grad          value_and_grad of the loss (forward + backward, no optimizer)
  forward       the loss alone
  layers_fwd    the layer scan alone (no LM head)
  head_grad     LM head + loss, forward and backward, on fixed hidden states
  optimizer     clip + AdamW update on fixed gradients
  matmuls_fwd   the forward's weight matmuls as plain jitted matmuls (what XLA reaches on them)
and, from the step's optimized HLO, the count of copy / transpose instructions and the bytes they move.
Prints one JSON line with seconds, shares of `step`, load and cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--remat", default="none")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.models.sharding import MeshConfig, make_mesh
    from mixsd_jax.models.transformer import forward
    from mixsd_jax.train import loss as loss_lib
    from mixsd_jax.train import step as step_lib
    from mixsd_jax.train.bench import machine_load, step_matmuls, synthetic_batch

    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    cfg, params = load_hf(resolve_model(args.model), mesh=mesh)
    dtype = jnp.dtype(args.dtype)
    options = step_lib.StepOptions(remat=args.remat)
    opt = step_lib.OptimConfig(lr=1e-5, total_steps=0)
    tx = step_lib.make_optimizer(opt)
    state = step_lib.init_state(params, tx, step_lib.state_shardings(cfg, tx, mesh))
    batch = step_lib.device_batch(synthetic_batch(cfg.vocab_size, args.batch, args.seq), mesh)
    micro = jax.tree.map(lambda x: x[0], batch)
    step_fn = step_lib.jit_train_step(cfg, opt, mesh, args.dtype, options)
    holder = {"state": state}

    def run_step():
        holder["state"], m = step_fn(holder["state"], batch)
        jax.block_until_ready(m)

    loss = lambda p: step_lib.micro_batch_sums(p, cfg, micro, dtype, options)[0]
    grad_fn = jax.jit(jax.value_and_grad(loss))
    fwd_fn = jax.jit(loss)
    layers_fn = jax.jit(lambda p: forward(p, cfg, micro["tokens"], micro["positions"], micro["segment_ids"],
                                          dtype=dtype)[0])
    hidden = layers_fn(params)
    head_fn = jax.jit(jax.grad(lambda p, h: loss_lib.nll_sums(p, cfg, h, micro, dtype)[0], argnums=(0, 1)))
    grads = grad_fn(params)[1]
    opt_fn = jax.jit(lambda g, s, p: tx.update(g, s, p))
    opt_state = jax.jit(tx.init)(params)  # the step donates (deletes) the state it is given
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    mats = [((jnp.ones((n, k), dtype), jnp.ones((k, m), dtype)), c) for (n, k, m), c in step_matmuls(cfg, args.batch * args.seq)]

    def run_mats():
        for (a, b), count in mats:
            for _ in range(count):
                jax.block_until_ready(mm(a, b))

    parts = {
        "step": run_step,
        "grad": lambda: jax.block_until_ready(grad_fn(params)),
        "forward": lambda: jax.block_until_ready(fwd_fn(params)),
        "layers_fwd": lambda: jax.block_until_ready(layers_fn(params)),
        "head_grad": lambda: jax.block_until_ready(head_fn(params, hidden)),
        "optimizer": lambda: jax.block_until_ready(opt_fn(grads, opt_state, params)),
        "matmuls_fwd": run_mats,
    }
    for fn in parts.values():  # compile and warm up
        fn()
    times = {name: [] for name in parts}
    for _ in range(args.reps):
        for name, fn in parts.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    med = {name: float(np.median(t)) for name, t in times.items()}

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), holder["state"])
    hlo = step_fn.lower(abstract, batch).compile().as_text()
    copies = _moves(hlo)
    print(json.dumps({
        "model": args.model, "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "remat": args.remat,
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "share_of_step": {k: round(v / med["step"], 3) for k, v in med.items()},
        "hlo_moves": copies,
        **machine_load(),
    }))


_SHAPE = re.compile(r"= (\w+)\[([\d,]*)\]")


def _moves(hlo: str) -> dict:
    """copy / transpose instructions of an optimized HLO module and the bytes they write."""
    sizes = {"f32": 4, "bf16": 2, "s32": 4, "f16": 2, "pred": 1, "u32": 4}
    out = {}
    for line in hlo.splitlines():
        op = re.search(r"[\]}] (copy|transpose|dynamic-slice|dynamic-update-slice)\(", line)
        if not op:
            continue
        m = _SHAPE.search(line)
        nbytes = 0
        if m:
            dims = [int(d) for d in m.group(2).split(",") if d]
            nbytes = int(np.prod(dims)) * sizes.get(m.group(1), 4)
        entry = out.setdefault(op.group(1), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
    return out


if __name__ == "__main__":
    main()

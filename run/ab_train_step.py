"""Interleaved A/B timing of our train step variants (compute dtype, remat, loss chunk) on one model.

  python run/ab_train_step.py --variants float32:none bfloat16:none float32:full [--steps 5]

Each variant is `dtype:remat[:loss_chunk]`. Steps of all variants alternate, so a change of machine
load hits each alike; prints one JSON line with each variant's median step time, tokens/s, its
ratio to the first variant, load and cores.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["float32:none", "bfloat16:none"])
    args = parser.parse_args()

    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.train.bench import machine_load, ours_stepper
    from mixsd_jax.train.step import StepOptions

    model_dir = resolve_model(args.model)
    steppers = {}
    for variant in args.variants:
        dtype, remat, *chunk = variant.split(":")
        options = StepOptions(remat=remat, loss_chunk=int(chunk[0]) if chunk else -1)
        steppers[variant], _ = ours_stepper(model_dir, args.batch, args.seq, dtype, options=options)
        steppers[variant]()  # compile + warm-up
    times = {v: [] for v in steppers}
    load_before = machine_load()["load_avg"]
    for _ in range(args.steps):
        for variant, step in steppers.items():
            started = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - started)
    med = {v: float(np.median(t)) for v, t in times.items()}
    first = args.variants[0]
    print(json.dumps({
        "model": args.model, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "median_step_s": {v: round(t, 4) for v, t in med.items()},
        "tokens_per_s": {v: round(args.batch * args.seq / t, 2) for v, t in med.items()},
        "speed_vs_first": {v: round(med[first] / t, 3) for v, t in med.items()},
        "step_s": {v: [round(x, 3) for x in t] for v, t in times.items()},
        "load_avg_before": load_before, **machine_load(),
    }))


if __name__ == "__main__":
    main()

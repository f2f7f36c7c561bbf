"""`mixsd bench memory`: the per-kernel memory / TPU plan of a config (bench.memory, bench.fit)."""

from __future__ import annotations

import argparse
import sys

from mixsd_jax.config import add_config_args


def register(sub, bench) -> None:
    m = bench.add_parser(
        "memory", help="per-device memory and roofline of each kernel of a config, by ahead-of-time compilation",
        description="Compiles every kernel the config runs (train and OPSD steps, the decode engine's kernels for "
        "generation and eval, eval scoring, the export's gather) at the config's shapes from abstract inputs (no "
        "weights) for a TPU topology (--topology, XLA:TPU via libtpu) or a simulated CPU mesh, and prints one JSON "
        "line per kernel: per-device bytes, whether it fits, XLA's flops and bytes, the roofline time.")
    m.add_argument("--topology", default=None,
                   help="a TPU slice to compile for, e.g. v5e:2x4, v5e:4x8, v4:2x2x1, v5p:4x4x4, v6e:8x8 "
                   "(needs the [tpu] extra; no TPU needed)")
    m.add_argument("--devices", type=int, default=8, help="simulated CPU devices where a mesh axis is -1 (no --topology)")
    m.add_argument("--chip-bytes", default=None,
                   help="per-device memory to check against (default: the topology's chip, else 16GiB)")
    m.add_argument("--kernels", default=None,
                   help="comma-separated subset of train_step,opsd_step,generate,eval_decode,eval_mc,eval_kl,export,memit")
    m.add_argument("--no-estimates", action="store_true",
                   help="skip the loop-scaled *_est figures (2 more small compiles per train kernel, 3 per decode)")
    m.add_argument("--fit", action="store_true",
                   help="search mesh factorizations, micro batches, remat and batch sizes for the fastest plan "
                   "whose every kernel fits with 10%% headroom; print it and its key=value overrides")
    m.add_argument("--fit-budget", type=int, default=12, help="most candidates compiled per stage by --fit")
    m.add_argument("--eval-prompt-len", type=int, default=1024, help="prompt bucket of the eval decode kernels")
    m.add_argument("--eval-row-len", type=int, default=2048, help="row bucket of the eval scoring kernels")
    m.add_argument("--eval-window", type=int, default=64, help="scored positions per row of the eval scoring kernel")
    add_config_args(m)
    m.set_defaults(func=_bench_memory)


def _bench_memory(args: argparse.Namespace) -> int:
    from mixsd_jax.bench import memory

    plan, target, kernels = memory.prepare(args, sys.argv[1:])
    if args.fit:
        from mixsd_jax.bench.fit import run_fit

        return run_fit(plan, target, kernels, args)
    return memory.run(args, plan, target, kernels)

"""`mixsd bench data|generate|train|opsd|opsd-recall|export-peak`: each prints one JSON line (with the machine's load
and cores where it times a model)."""

from __future__ import annotations

import argparse
import json

from mixsd_jax.models.registry import EMBEDDED_DEFAULT


def register(sub, bench) -> None:
    d = bench.add_parser("data", help="batch stream throughput over a JSONL file or TFDS dir")
    d.add_argument("source")
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--steps", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_data)

    b = bench.add_parser("generate", help="decode engine vs its peers, repeated A/B pairs (one JSON line)")
    b.add_argument("--model", default=EMBEDDED_DEFAULT, help="HF-format directory or registry name")
    b.add_argument("--workload", choices=["default", "capacity", "longtail", "blocks"], default="default",
                   help="default: mix vs plain vs PyTorch; capacity: N=64 vs N=8192; longtail: continuous vs "
                        "fixed batches; blocks: mix and plain under each --blocks size")
    b.add_argument("--batch-size", type=int, default=None, help="slots (default: 32; capacity, longtail, blocks: 16)")
    b.add_argument("--records", type=int, default=None, help="records (capacity: 16; longtail: 32)")
    b.add_argument("--max-new-tokens", type=int, default=None, help="default: 64; longtail: 512")
    b.add_argument("--lambda", dest="lambda_", type=float, default=0.3)
    b.add_argument("--dtype", default="auto", choices=("float32", "bfloat16", "auto"),
                   help="our compute dtype (auto: bfloat16 on accelerators and CPUs with AMX or AVX512-BF16, else float32)")
    b.add_argument("--param-dtype", default="auto",
                   help="our weights' storage dtype (auto: the compute dtype; decoding keeps no master copy)")
    b.add_argument("--torch-dtypes", default="float32,bfloat16", type=lambda s: tuple(s.split(",")),
                   help="PyTorch's dtypes, comma-separated: the ratios take its faster one in each round")
    b.add_argument("--mesh", nargs="?", const="data=-1", default=None, metavar="AXIS=N[,AXIS=N]",
                   help="run our side on a mesh, e.g. --mesh tensor=4 (tensor-parallel decode); default: one device")
    b.add_argument("--repeats", type=int, default=5, help="timed rounds of the interleaved A/B pairs")
    b.add_argument("--no-hf", "--no-torch", dest="no_hf", action="store_true",
                   help="skip the transformers measurements")
    b.add_argument("--block", type=int, default=None,
                   help="cache slots per attention block of our engine (default: on CPU 32 in bf16 and 128 in f32, "
                        "512 elsewhere)")
    b.add_argument("--blocks", default="64,128", type=lambda s: [int(x) for x in s.split(",")],
                   help="block sizes the blocks workload compares, comma-separated (default: 64,128)")
    b.set_defaults(func=_generate)

    t = bench.add_parser("train", help="our train step vs a PyTorch AdamW step: tokens/s and ratio")
    _model_and_steps(t, steps=5, help_steps="timed steps of each side, interleaved (after one untimed warm-up step)")
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    t.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU")
    t.add_argument("--remat", default="none", help="layer-scan rematerialisation (train config key remat)")
    t.add_argument("--loss-chunk", type=int, default=-1, help="LM-head loss chunk (train config key loss_chunk)")
    t.add_argument("--attention-block", type=int, default=-1, help="attention block (train config key attention_block)")
    t.add_argument("--compare", action="store_true",
                   help="interleave ours in f32 and in --compute-dtype (default auto) with PyTorch in f32 and "
                        "bf16 autocast, --steps rounds; reports each side and our best over PyTorch's best")
    t.set_defaults(func=_train)

    o = bench.add_parser("opsd", help="where an OPSD step's time goes: rollout, teacher+student forward, update")
    _model_and_steps(o, steps=5, help_steps="timed OPSD steps (after one untimed step that compiles)")
    o.add_argument("--seq-len", type=int, default=128, help="sequence length (at least 256 is used)")
    o.add_argument("--data", default=None, help="prompts with ground truth (default: a tiny KGFact corpus)")
    o.add_argument("--rollouts", type=int, default=2, help="rollouts per prompt")
    o.add_argument("--max-new-tokens", type=int, default=32, help="rollout length limit")
    o.set_defaults(func=_opsd)

    e = bench.add_parser("export-peak", help="the HF export's measured per-device peak (live arrays at each gather)")
    e.add_argument("--model", default=EMBEDDED_DEFAULT, help="HF-format directory or registry name")
    e.add_argument("--mesh", default="fsdp=-1", metavar="AXIS=N[,AXIS=N]", help="the parameters' mesh (default: fsdp=-1)")
    e.add_argument("--param-dtype", default="float32")
    e.add_argument("--export-dtype", default="float32")
    e.set_defaults(func=_export_peak)

    r = bench.add_parser("opsd-recall", help="OPSD on a few KGFact facts: recall and GT NLL before and after")
    r.add_argument("--model", default=EMBEDDED_DEFAULT, help="HF-format directory or registry name")
    r.add_argument("--facts", type=int, default=4, help="training facts (one batch)")
    r.add_argument("--steps", type=int, default=16)
    r.add_argument("--lr", type=float, default=2e-4)
    r.add_argument("--max-new-tokens", type=int, default=32, help="rollout length")
    r.add_argument("--out", default="/tmp/opsd_recall", help="work folder (the corpus and the training run)")
    r.set_defaults(func=_opsd_recall)


def _model_and_steps(parser: argparse.ArgumentParser, *, steps: int, help_steps: str) -> None:
    """The options `bench train` and `bench opsd` share."""
    parser.add_argument("--model", default=EMBEDDED_DEFAULT, help="HF-format directory or registry name")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=steps, help=help_steps)
    parser.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16", "auto"),
                        help="auto: bfloat16 on accelerators and on CPUs with AMX or AVX512-BF16, else float32 "
                             "(default: float32; auto with bench train --compare)")
    parser.add_argument("--random-init", action="store_true",
                        help="random weights from the model directory's config.json (no weight files needed)")


def _data(args: argparse.Namespace) -> int:
    from mixsd_jax.bench.data import bench_data

    print(json.dumps(bench_data(args.source, args.batch_size, args.steps, args.seed)))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from mixsd_jax.bench.generate import bench_generate

    mesh_cfg = None
    if args.mesh is not None:
        from mixsd_jax import config as config_lib
        from mixsd_jax.models.sharding import MeshConfig

        mesh_cfg = config_lib.from_dict(MeshConfig, config_lib.parse_overrides(args.mesh.split(",")), prefix="mesh.")
    workload = args.workload
    batch_size = args.batch_size or (32 if workload == "default" else 16)
    max_new_tokens = args.max_new_tokens or (512 if workload == "longtail" else 64)
    records = args.records or (16 if workload == "capacity" else 32)
    dtype = _resolved_dtype(args.dtype)
    param_dtype = dtype if args.param_dtype == "auto" else args.param_dtype
    print(json.dumps(bench_generate(args.model, workload, batch_size, max_new_tokens, args.lambda_, dtype,
                                    args.repeats, with_torch=not args.no_hf, records=records, mesh_cfg=mesh_cfg,
                                    param_dtype=param_dtype, block=args.block, blocks=args.blocks,
                                    torch_dtypes=args.torch_dtypes)),
          flush=True)
    return 0


def _export_peak(args: argparse.Namespace) -> int:
    from mixsd_jax import config as config_lib
    from mixsd_jax.bench.export_peak import bench_export_peak
    from mixsd_jax.models.sharding import MeshConfig

    mesh_cfg = config_lib.from_dict(MeshConfig, config_lib.parse_overrides(args.mesh.split(",")), prefix="mesh.")
    result = bench_export_peak(args.model, mesh_cfg, args.param_dtype, args.export_dtype)
    from mixsd_jax import multihost

    if multihost.is_primary():
        print(json.dumps(result), flush=True)
    return 0


def _step_options(args):
    from mixsd_jax.errors import MixsdError
    from mixsd_jax.models.transformer import REMAT_POLICIES
    from mixsd_jax.train.step import StepOptions

    if args.remat not in REMAT_POLICIES:
        raise MixsdError(f"--remat {args.remat!r}: unknown policy (known: {', '.join(REMAT_POLICIES)})")
    return StepOptions(remat=args.remat, loss_chunk=args.loss_chunk, attention_block=args.attention_block)


def _train(args: argparse.Namespace) -> int:
    from mixsd_jax.bench.train import bench_train, compare_train

    if args.compare:
        print(json.dumps(compare_train(
            args.model, batch_size=args.batch_size, seq_len=args.seq_len, rounds=args.steps,
            compute_dtype=args.compute_dtype or "auto", random_init=args.random_init, options=_step_options(args),
        )))
        return 0
    print(json.dumps(bench_train(
        args.model, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
        compute_dtype=args.compute_dtype or "float32", torch_compare=not args.no_torch, random_init=args.random_init,
        peak_tflops=args.peak_tflops, options=_step_options(args),
    )))
    return 0


def _resolved_dtype(name: str) -> str:
    import jax

    from mixsd_jax.train.precision import resolve_compute_dtype

    return resolve_compute_dtype(name, jax.default_backend())


def _opsd(args: argparse.Namespace) -> int:
    from mixsd_jax.bench.opsd import bench_opsd

    print(json.dumps(bench_opsd(
        args.model, data=args.data, batch_size=args.batch_size, num_rollouts=args.rollouts,
        max_new_tokens=args.max_new_tokens, max_seq_len=max(args.seq_len, 256), steps=args.steps,
        compute_dtype=_resolved_dtype(args.compute_dtype or "float32"), random_init=args.random_init,
    )))
    return 0


def _opsd_recall(args: argparse.Namespace) -> int:
    from mixsd_jax.bench.opsd_recall import opsd_recall

    print(json.dumps(opsd_recall(args.model, facts=args.facts, steps=args.steps, lr=args.lr,
                                 max_new_tokens=args.max_new_tokens, out=args.out)))
    return 0

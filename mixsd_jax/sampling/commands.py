"""`mixsd generate`, `mixsd bench generate` and `mixsd models parity` (it checks our decoder too)."""

from __future__ import annotations

import argparse
import json
import sys

from mixsd_jax import compile_cache
from mixsd_jax.config import add_config_args
from mixsd_jax.errors import MixsdError

# flag -> GenerateConfig key
_GENERATE_FLAGS = {
    "input": "input",
    "out": "out_dir",
    "model": "model",
    "lambda_": "lambda_mix",
    "temperature": "temperature",
    "topk": "topk",
    "seed": "seed",
    "max_retries": "max_retries",
    "extract_mode": "extract_mode",
    "preset": "preset",
    "batch_size": "batch_size",
    "max_new_tokens": "max_new_tokens",
    "num_generations": "num_generations",
    "limit": "limit",
}


def register(sub, bench) -> None:
    p = sub.add_parser("generate", help="generate MixSD mixed targets for a record file")
    p.add_argument("--input", help="messages/alpaca JSONL with user x and ground truth y*")
    p.add_argument("--out", help="output directory")
    p.add_argument("--model", help="registry name or HF-format directory")
    p.add_argument("--lambda", dest="lambda_", type=float, help="probability of a naive token (0 = pure expert)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--topk", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-retries", type=int)
    p.add_argument("--extract-mode", choices=["boxed", "last_number", "boxed_or_last_number", "contains"])
    p.add_argument("--preset", help="knowledge | math_operations | simpleqa | custom")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--num-generations", type=int)
    p.add_argument("--limit", type=int)
    p.add_argument("--keep-rejected", action="store_true", default=None, help="write failures into the training file")
    add_config_args(p)
    p.set_defaults(func=_generate)

    b = bench.add_parser("generate", help="decode engine vs its peers, repeated A/B pairs (one JSON line)")
    b.add_argument("--model", default="smollm2-135m-instruct")
    b.add_argument("--workload", choices=["default", "capacity", "longtail", "blocks"], default="default",
                   help="default: mix vs plain vs PyTorch; capacity: N=64 vs N=8192; longtail: continuous vs "
                        "fixed batches; blocks: mix and plain under each --blocks size")
    b.add_argument("--batch-size", type=int, default=None, help="slots (default: 32; capacity, longtail, blocks: 16)")
    b.add_argument("--records", type=int, default=None, help="records (capacity: 16; longtail: 32)")
    b.add_argument("--max-new-tokens", type=int, default=None, help="default: 64; longtail: 512")
    b.add_argument("--lambda", dest="lambda_", type=float, default=0.3)
    b.add_argument("--dtype", default="float32")
    b.add_argument("--param-dtype", default="float32")
    b.add_argument("--mesh", nargs="?", const="data=-1", default=None, metavar="AXIS=N[,AXIS=N]",
                   help="run our side on a mesh, e.g. --mesh tensor=4 (tensor-parallel decode); default: one device")
    b.add_argument("--repeats", type=int, default=5, help="timed rounds of the interleaved A/B pairs")
    b.add_argument("--no-hf", "--no-torch", dest="no_hf", action="store_true",
                   help="skip the transformers measurements")
    b.add_argument("--block", type=int, default=None,
                   help="cache slots per attention block of our engine (default: 128 on CPU, 512 elsewhere)")
    b.add_argument("--blocks", default="64,128", type=lambda s: [int(x) for x in s.split(",")],
                   help="block sizes the blocks workload compares, comma-separated (default: 64,128)")
    b.set_defaults(func=_bench)

    if "models" in sub.choices:  # absent when only this package's commands are registered
        from mixsd_jax.models.commands import models_actions

        p = models_actions(sub).add_parser(
            "parity", help="compare our logits and greedy decoding with transformers (PyTorch)")
        p.add_argument("model", metavar="MODEL", help="HF-format directory or registry name")
        p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="our compute dtype")
        p.add_argument("--gguf", action="store_true",
                       help="reference = transformers' own load of the model's GGUF (embedded models only)")
        p.set_defaults(func=_parity)


def _generate(args: argparse.Namespace) -> int:
    from mixsd_jax import config as config_lib
    from mixsd_jax.sampling.generator import GenerateConfig, generate

    flags = {key: getattr(args, flag) for flag, key in _GENERATE_FLAGS.items()}
    flags["keep_rejected"] = args.keep_rejected
    cfg = config_lib.load(GenerateConfig, args.config, args.overrides, flags=flags)
    compile_cache.enable(cfg.storage, cfg.out_dir)
    summary = generate(cfg)
    if summary.get("skipped_existing"):
        print(f"already generated (same settings): {summary['output']}")
    print(
        f"accepted {summary['accepted']} / {summary['generations']} (pass rate {summary['pass_rate']:.3f}), "
        f"rejected {summary['rejected']}, prompt too long {summary['prompt_too_long']}, "
        f"no GT answer {summary['no_gt_answer']}, mean naive-token fraction {summary['mean_naive_token_fraction']:.3f}"
    )
    print(f"wrote {summary['output']}")
    print(f"wrote {summary['rejected_output']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from mixsd_jax.sampling.bench import bench_generate

    mesh_cfg = None
    if args.mesh is not None:
        from mixsd_jax import config as config_lib
        from mixsd_jax.models.sharding import MeshConfig

        mesh_cfg = config_lib.from_dict(MeshConfig, config_lib.parse_overrides(args.mesh.split(",")), prefix="mesh.")
    workload = args.workload
    batch_size = args.batch_size or (32 if workload == "default" else 16)
    max_new_tokens = args.max_new_tokens or (512 if workload == "longtail" else 64)
    records = args.records or (16 if workload == "capacity" else 32)
    print(json.dumps(bench_generate(args.model, workload, batch_size, max_new_tokens, args.lambda_, args.dtype,
                                    args.repeats, with_torch=not args.no_hf, records=records, mesh_cfg=mesh_cfg,
                                    param_dtype=args.param_dtype, block=args.block, blocks=args.blocks)),
          flush=True)
    return 0


def _parity(args: argparse.Namespace) -> int:
    from mixsd_jax.models.registry import pulled_from, resolve_model
    from mixsd_jax.sampling.parity import F32_MAX_ABS_LOGIT_DIFF, parity_passed, run_parity

    model_dir = resolve_model(args.model)
    if args.gguf and pulled_from(model_dir) is None:
        raise MixsdError(
            f"{model_dir}: --gguf needs an embedded model pulled by `mixsd models pull` (its GGUF is the reference)"
        )
    result = run_parity(model_dir, dtype=args.dtype, reference="gguf" if args.gguf else "hf_dir")
    print(json.dumps(result))
    if args.dtype == "float32" and not parity_passed(result):
        print(
            f"error: parity check failed (max_abs_logit_diff must be <= {F32_MAX_ABS_LOGIT_DIFF}, "
            "argmax_agreement 1.0, greedy_tokens_equal true)",
            file=sys.stderr,
        )
        return 1
    return 0

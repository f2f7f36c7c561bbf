"""`mixsd generate` and `mixsd models parity` (it checks our decoder too)."""

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

"""`mixsd eval`: a base model and tuned checkpoints × suites → results.json, report.md, plots."""

from __future__ import annotations

import argparse

from mixsd_jax import compile_cache, storage
from mixsd_jax.config import add_config_args


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _limit(text: str):
    if text.lower() in ("all", "none"):
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def register(sub, bench) -> None:
    p = sub.add_parser(
        "eval",
        help="memorization, retention and forgetting analyses of a base model and tuned checkpoints",
        description="Suites: memorization (corpus test splits), retention (held-out benchmarks), nll (training "
        "targets under the base), kl (KL(base||tuned) on held-out prompts), fisher (Fisher-weighted displacement), "
        "errors (causes of wrong answers), all. Finished (checkpoint, benchmark) pieces are reused on a rerun.",
    )
    p.add_argument("--base", help="base model: registry name or HF-format directory")
    p.add_argument("--tuned", action="append", metavar="NAME=CKPT",
                   help="a tuned checkpoint (HF dir or training run dir); repeatable")
    p.add_argument("--suite", type=_comma_list, metavar="NAME[,NAME]", help="suites to run (default: retention)")
    p.add_argument("--benchmarks", type=_comma_list, metavar="NAME[,NAME]", help="retention benchmarks")
    p.add_argument("--limit", type=_limit, help="items per benchmark / test split (seeded subset), or 'all'")
    p.add_argument("--out", help="output directory")
    p.add_argument("--corpus", help="built corpus directory (KGFact/MQuAKE/KGFunc) for memorization")
    p.add_argument("--train-file", action="append", metavar="NAME=PATH",
                   help="training file whose targets' NLL under the base is analysed; repeatable")
    p.add_argument("--label", action="append", metavar="NAME=LABEL", help="plot label of a checkpoint; repeatable")
    p.add_argument("--data-root", help="benchmark data root (default: the bundled subsets)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--allow-code-execution", action="store_true", default=None,
                   help="run model-written code for HumanEval (in a sandboxed subprocess)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(p)
    p.set_defaults(func=cmd_eval)


def eval_config_from_args(args):
    from mixsd_jax import config as config_lib
    from mixsd_jax.eval.config import EvalConfig

    flags = {
        "base": args.base,
        "tuned": tuple(args.tuned) if args.tuned else None,
        "suites": args.suite,
        "benchmarks": args.benchmarks,
        "limit": None if args.limit == "all" else args.limit,
        "out_dir": args.out,
        "corpus_dir": args.corpus,
        "train_files": tuple(args.train_file) if args.train_file else None,
        "labels": tuple(args.label) if args.label else None,
        "data_root": args.data_root,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "allow_code_execution": args.allow_code_execution,
    }
    cfg = config_lib.load(EvalConfig, args.config, args.overrides, flags=flags)
    if args.limit == "all" and cfg.limit is not None:  # a None flag is "not given": set it explicitly
        import dataclasses

        cfg = dataclasses.replace(cfg, limit=None)
    return cfg


def cmd_eval(args) -> int:
    from mixsd_jax.eval.report import render_table
    from mixsd_jax.eval.runner import evaluate

    cfg = eval_config_from_args(args)
    compile_cache.enable(cfg.storage, cfg.out_dir)
    results = evaluate(cfg, progress=not args.quiet)
    print(render_table(results))
    out = storage.path(cfg.out_dir)
    print(f"total {results['timing']['total_s']:.1f} s")
    print(f"wrote {out / 'results.json'}")
    print(f"wrote {out / 'report.md'}")
    return 0

"""`mixsd pipeline` and `mixsd demo`."""

from __future__ import annotations

import argparse

from mixsd_jax import compile_cache
from mixsd_jax.config import add_config_args


def register(sub, bench) -> None:
    p = sub.add_parser("pipeline", help="corpus → MixSD targets → training runs → evaluation → report, resumable")
    p.add_argument("--dry-run", action="store_true", help="print the stages and whether each is done; run nothing")
    p.add_argument("--only", default=None, metavar="MODEL",
                   help="a study config (`models:`): the shared corpus and this model only, then the scaling report; "
                   "`--only corpus`: the shared corpus alone; `--only scaling`: the scaling report alone")
    add_config_args(p)
    p.set_defaults(func=_pipeline)

    d = sub.add_parser("demo", help="the pipeline on the embedded default model, sized for a laptop CPU")
    d.add_argument("--quick", action="store_true", help="fewer facts and steps: a first look in a few minutes")
    d.add_argument("--out", default=None, help="experiment folder (default: the config's out_dir)")
    d.add_argument("--dry-run", action="store_true", help="print the stages; run nothing")
    d.add_argument("overrides", nargs="*", default=[], help="key=value config overrides")
    d.set_defaults(func=_demo)


def _pipeline(args: argparse.Namespace) -> int:
    from mixsd_jax.errors import MixsdError
    from mixsd_jax.pipeline.config import load_experiment

    if args.config is None:
        raise MixsdError("pipeline: --config FILE is required (see configs/ for examples)")
    cfg = load_experiment(args.config, args.overrides)
    if cfg.models:
        return _run_study(cfg, args.only, args.dry_run)
    if args.only is not None:
        raise MixsdError(f"--only {args.only!r}: {args.config} runs one model (no 'models' list)")
    return _run(cfg, args.dry_run)


def _run_study(cfg, only: str | None, dry_run: bool) -> int:
    from mixsd_jax.pipeline.study import REPORT_ONLY, build_study, describe_study, run_study, write_study_report

    if only == REPORT_ONLY:  # reads the model folders only: works where no model is installed
        if dry_run:
            print(f"would rewrite the scaling report under {cfg.out_dir}/scaling from the model folders")
            return 0
        return _print_study_paths(write_study_report(cfg))
    study = build_study(cfg, only, dry_run)
    if dry_run:
        print(describe_study(study))
        return 0
    compile_cache.enable(cfg.storage, cfg.out_dir)
    paths = run_study(study)
    for name, plan in study.plans.items():
        print(f"{name}: report: {plan.report}")
    return _print_study_paths(paths)


def _print_study_paths(paths: dict) -> int:
    for key, path in paths.items():
        if key.startswith("plot_"):
            print(f"plot: {path}")
    if paths:
        print(f"scaling table: {paths['scaling']}")
        print(f"report: {paths['report']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mixsd_jax.pipeline.demo import demo_config

    return _run(demo_config(args.quick, args.out, args.overrides), args.dry_run)


def _run(cfg, dry_run: bool) -> int:
    from mixsd_jax.pipeline.plan import build_plan
    from mixsd_jax.pipeline.runner import describe, report_text, run_plan

    plan = build_plan(cfg, dry_run=dry_run)
    if dry_run:
        print(describe(plan))
        return 0
    compile_cache.enable(cfg.storage, cfg.out_dir)
    run_plan(plan)
    print(report_text(plan))
    return 0

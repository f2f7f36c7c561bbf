"""`mixsd train`: SFT / MixSD / OPSD training, resume, export."""

from __future__ import annotations

from mixsd_jax import compile_cache
from mixsd_jax.config import add_config_args

# Flag -> TrainConfig key; a flag given on the command line wins over --config and key=value.
_FLAG_KEYS = {
    "data": "data",
    "model": "model",
    "out": "out",
    "steps": "steps",
    "epochs": "epochs",
    "lr": "lr",
    "batch_size": "batch_size",
    "seed": "seed",
    "method": "method",
}


def register(subparsers, bench_subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune on a messages JSONL (ground truth = SFT, mixed targets = MixSD, --method opsd = OPSD); "
        "resumes from --out",
        description="Masked-NLL training with AdamW. Re-running with the same --out resumes from the latest "
        "checkpoint; raising --steps/--epochs extends a finished run.",
    )
    p.add_argument("--data", help="messages/alpaca JSONL or TFDS dataset directory")
    p.add_argument("--method", choices=("sft", "opsd"),
                   help="sft: masked NLL on the assistant turns (default); opsd: on-policy self-distillation on "
                   "the prompts, the ground truth in the teacher's user turn (the `opsd.*` keys)")
    p.add_argument("--model", help="HF-format directory or registry name")
    p.add_argument("--out", help="output directory (checkpoints, metrics, hf export)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs passes over the data)")
    p.add_argument("--epochs", type=int, help="passes over the data when --steps is not given")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--batch-size", type=int, help="global batch size in sequences")
    p.add_argument("--seed", type=int, help="data-order seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--export", metavar="STEP", default=None,
                   help="do not train: export checkpoint STEP (or 'latest') of the run in --out to HF format")
    add_config_args(p)
    p.set_defaults(func=cmd_train)


def train_config_from_args(args):
    import dataclasses

    from mixsd_jax.train.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    flags = {key: getattr(args, attr) for attr, key in _FLAG_KEYS.items() if getattr(args, attr) is not None}
    return dataclasses.replace(cfg, **flags)  # validated again by __post_init__


def cmd_train(args) -> int:
    cfg = train_config_from_args(args)
    if args.export is not None:
        from mixsd_jax.errors import MixsdError
        from mixsd_jax.models.export import export_checkpoint

        if args.export != "latest" and not args.export.isdigit():
            raise MixsdError(f"--export {args.export!r}: expected a step number or 'latest'")
        step = None if args.export == "latest" else int(args.export)
        # On a pod every host runs this command: they join one run (the export's gathers are
        # collectives, process 0 writes) instead of each exporting alone into the same folder.
        from mixsd_jax import multihost

        multihost.maybe_initialize(cfg.distributed)
        dest = export_checkpoint(cfg.out, step)
        if multihost.is_primary():
            print(f"exported: {dest}")
        return 0

    from mixsd_jax.train.loop import train

    compile_cache.enable(cfg.storage, cfg.out)
    summary = train(cfg, progress=not args.no_progress)
    print(
        f"trained {summary['steps_this_run']} steps (to step {summary['steps']}), final loss "
        f"{_fmt(summary['final_loss'])}, {_fmt(summary['tokens_per_s'])} tokens/s; "
        f"dropped {summary['dropped_overlong']}, truncated {summary['truncated']} overlong records"
    )
    print(f"wrote: {summary['checkpoints']} (checkpoints), {summary['hf']} (HF model), {cfg.out}/summary.json")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"

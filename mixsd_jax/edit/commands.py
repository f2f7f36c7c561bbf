"""`mixsd edit --method memit`: write a corpus's facts into a model's MLP weights (MEMIT)."""

from __future__ import annotations

from mixsd_jax import compile_cache
from mixsd_jax.config import add_config_args

# Flag -> EditConfig key; a flag given on the command line wins over --config and key=value.
_FLAG_KEYS = {"data": "data", "model": "model", "out": "out", "method": "method"}


def register(subparsers, bench_subparsers) -> None:
    p = subparsers.add_parser(
        "edit", help="edit a model's weights to state a corpus's facts (MEMIT), exported as an HF directory",
        description="One MEMIT request per record (its `subject`, the question with the subject as {}, the "
        "first \\boxed{} answer as target); key=value overrides set the EditConfig keys (layers=[3,4,5], "
        "prompt=plain, v_steps=25, mom2_update_weight=15000, ...).",
    )
    p.add_argument("--method", choices=("memit",), help="editing method (memit)")
    p.add_argument("--data", help="messages/alpaca JSONL with a `subject` per record")
    p.add_argument("--model", help="HF-format directory or registry name")
    p.add_argument("--out", help="output directory (hf/, requests.jsonl, summary.json)")
    add_config_args(p)
    p.set_defaults(func=cmd_edit)


def cmd_edit(args) -> int:
    from mixsd_jax.edit.config import load_edit_config
    from mixsd_jax.edit.runner import edit

    flags = {key: getattr(args, attr) for attr, key in _FLAG_KEYS.items()}
    cfg = load_edit_config(args.config, args.overrides, flags=flags)
    compile_cache.enable()
    summary = edit(cfg)
    print(f"edited {summary['requests']} facts into layers {summary['layers']} in {summary['edit_s']:.1f}s "
          f"(second moments {summary['stats_s']:.1f}s); efficacy {summary['efficacy_before']:.2f} -> "
          f"{summary['efficacy']:.2f}")
    print(f"wrote: {summary['hf']} (HF model), {cfg.out}/summary.json, {cfg.out}/requests.jsonl")
    return 0

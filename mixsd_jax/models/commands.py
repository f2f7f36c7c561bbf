"""`mixsd models ...`: pull the embedded default, convert a GGUF, inspect, export.

Every MODEL argument is an HF-format directory or a registry name (see `registry.resolve_model`).
Heavy imports (JAX, transformers) happen inside the handlers so `mixsd --help` stays fast.
`mixsd models parity` also checks our decoder, so `sampling/commands.py` adds it to this group
(through `models_actions`): `models` imports nothing above it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError



def models_actions(subparsers):
    """The `mixsd models` group's actions, for packages above `models` to add theirs to."""
    return subparsers.choices["models"].actions


def register(subparsers, bench_subparsers) -> None:
    models = subparsers.add_parser("models", help="pull, convert, inspect, check and export models")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    models.set_defaults(func=lambda args: _help(models))
    models.actions = sub

    p = sub.add_parser("pull", help="fetch and convert an embedded model once; prints its directory")
    p.add_argument("name", metavar="NAME", help="registry name, e.g. smollm2-135m-instruct or gemma3-270m")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("convert", help="convert a llama or gemma3 GGUF file into an HF-format directory")
    p.add_argument("gguf", metavar="GGUF", help="path of the .gguf file")
    p.add_argument("out", metavar="OUT", help="output directory (replaced if it exists)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="architecture, parameter count and dtype of a model")
    p.add_argument("model", metavar="MODEL", help="HF-format directory or registry name")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of one line per field")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="load a model with our loader and write it as an HF-format directory")
    p.add_argument("model", metavar="MODEL", help="HF-format directory or registry name")
    p.add_argument("out", metavar="OUT", help="output directory (replaced if it exists)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the written weights")
    p.set_defaults(func=cmd_export)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def cmd_pull(args) -> int:
    from mixsd_jax.models.registry import pull

    print(pull(args.name))
    return 0


def cmd_convert(args) -> int:
    from mixsd_jax.models.gguf import convert_gguf_to_hf

    print(convert_gguf_to_hf(args.gguf, args.out))
    return 0


def cmd_inspect(args) -> int:
    info = inspect_model(args.model)
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(key) for key in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def inspect_model(name_or_path: str) -> dict:
    """What `mixsd models inspect` prints; reads config.json and the safetensors headers only."""
    from mixsd_jax.models.checkpoint import read_hf_tensors
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.registry import resolve_model

    model_dir = resolve_model(name_or_path)
    cfg = ModelConfig.from_hf_dir(model_dir)
    hf_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    tensors = read_hf_tensors(model_dir)  # memory-mapped: nothing is read but the headers
    counted = {
        name: t for name, t in tensors.items()
        if not name.endswith("rotary_emb.inv_freq") and not (cfg.tie_word_embeddings and name == "lm_head.weight")
    }
    dtypes = sorted({str(t.dtype) for t in counted.values()})
    return {
        "model_dir": str(model_dir),
        "architecture": (hf_config.get("architectures") or ["?"])[0],
        "model_type": cfg.model_type,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "parameters": int(sum(t.size for t in counted.values())),
        "dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes),
    }


def cmd_export(args) -> int:
    from mixsd_jax.models.checkpoint import export_hf, load_hf
    from mixsd_jax.models.gguf import check_replaceable
    from mixsd_jax.models.registry import resolve_model

    model_dir = resolve_model(args.model)
    out = storage.path(args.out)
    if not storage.is_url(out) and Path(out).resolve() == Path(model_dir).resolve():
        raise MixsdError(f"{out}: is the model's own directory; export somewhere else")
    check_replaceable(out)
    cfg, params = load_hf(model_dir, param_dtype="float32")
    print(export_hf(params, cfg, args.out, tokenizer_dir=model_dir, dtype=args.dtype))
    return 0

"""`mixsd data build|validate|convert|import`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from mixsd_jax import storage
from mixsd_jax.config import add_config_args
from mixsd_jax.errors import MixsdError

DATASETS = ("kgfact", "kgfunc", "simpleqa", "mquake")
DEFAULT_PRESET = {"kgfact": "small", "kgfunc": "full", "simpleqa": "full", "mquake": "full"}
SIMPLEQA_LIMITS = {"full": None, "small": 500, "tiny": 20}
MQUAKE_FACTS = {"full": (100, 100), "small": (50, 50), "tiny": (10, 10)}
# The benchmark checkout next to the project (../shared/benchmarks); users pass --source otherwise.
SIMPLEQA_CSV = Path(__file__).resolve().parents[3] / "shared/benchmarks/simpleqa/simple_qa_test_set.csv"


@dataclass(frozen=True)
class BuildConfig:
    out: str | None = None
    preset: str | None = None  # None: the dataset's default preset
    seed: int = 42
    source: str | None = None  # simpleqa CSV or MQuAKE JSON
    limit: int | None = None  # simpleqa: keep the first N shuffled rows
    num_domains: int | None = None  # kgfact
    num_entities: int | None = None  # kgfact
    num_compositional: int | None = None  # kgfact
    max_facts: int | None = None  # mquake
    eval_max_facts: int | None = None  # mquake

    def __post_init__(self):
        if self.seed < 0:
            raise MixsdError(f"config key 'seed': {self.seed} must be non-negative")
        if self.limit is not None and self.limit < 1:
            raise MixsdError(f"config key 'limit': {self.limit} must be a positive integer")
        for key in ("num_domains", "num_entities", "num_compositional", "max_facts", "eval_max_facts"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise MixsdError(f"config key {key!r}: {value} must be non-negative")


def register(subparsers, bench_subparsers) -> None:
    data = subparsers.add_parser("data", help="build, validate, convert and import datasets")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda args: _usage(data))

    build = sub.add_parser(
        "build",
        help="write a corpus (messages JSONL) into --out",
        epilog="key=value overrides go right after the dataset name: "
        "mixsd data build kgfunc seed=3 --config build.yaml",
    )
    build.add_argument("dataset", choices=DATASETS)
    build.add_argument("--preset", default=None, help="kgfact: tiny|small|large; kgfunc: tiny|small|full; "
                       "simpleqa: tiny|small|full; mquake: tiny|small|full")
    build.add_argument("--seed", type=int, default=None)
    build.add_argument("--out", default=None, help="output folder")
    build.add_argument("--source", default=None, help="input file (simpleqa CSV, MQuAKE JSON)")
    add_config_args(build)
    build.set_defaults(func=run_build)

    validate = sub.add_parser("validate", help="check a JSONL file; exit 1 if it has errors")
    validate.add_argument("file")
    validate.add_argument("--allow-empty-assistant", action="store_true", help="accept empty answers")
    validate.add_argument("--strict", action="store_true", help="repeated records are errors too")
    validate.add_argument("--max-shown", type=int, default=50, help="errors printed (all are counted)")
    validate.set_defaults(func=run_validate)

    convert = sub.add_parser("convert", help="alpaca/messages JSONL -> messages JSONL, or JSONL -> TFDS")
    convert.add_argument("--to", required=True, choices=("messages", "tfds"))
    convert.add_argument("input")
    convert.add_argument("output", help="messages: output file; tfds: data_dir")
    convert.add_argument("--name", default=None, help="TFDS dataset name (default: from the file name)")
    convert.add_argument("--allow-empty-assistant", action="store_true")
    convert.set_defaults(func=run_convert)

    imp = sub.add_parser("import", help="validate and copy the authors' released dataset folder")
    imp.add_argument("src")
    imp.add_argument("out")
    imp.set_defaults(func=run_import)


def _usage(parser) -> int:
    parser.print_help()
    return 2


def build_config(args) -> BuildConfig:
    from mixsd_jax import config

    cfg = config.load(BuildConfig, args.config, args.overrides)
    flags = {k: getattr(args, k) for k in ("out", "preset", "seed", "source") if getattr(args, k) is not None}
    return dataclasses.replace(cfg, **flags)


def run_build(args) -> int:
    cfg = build_config(args)
    if cfg.out is None:
        raise MixsdError("data build: --out (config key 'out') is required")
    preset = cfg.preset or DEFAULT_PRESET[args.dataset]
    counts = build_dataset(args.dataset, cfg, preset)
    _print_counts(storage.path(cfg.out), counts)
    return 0


def build_dataset(dataset: str, cfg: BuildConfig, preset: str) -> dict[str, int]:
    out = storage.path(cfg.out)
    if dataset == "kgfunc":
        from mixsd_jax.data.kgfunc import build_kgfunc

        return build_kgfunc(out, seed=cfg.seed, preset=preset)
    if dataset == "kgfact":
        from mixsd_jax.data.kgfact import build_kgfact

        optional = {k: getattr(cfg, k) for k in ("num_domains", "num_entities", "num_compositional") if getattr(cfg, k) is not None}
        return build_kgfact(out, preset=preset, seed=cfg.seed, **optional)
    if dataset == "simpleqa":
        from mixsd_jax.data.simpleqa import convert_simpleqa

        if preset not in SIMPLEQA_LIMITS:
            raise MixsdError(f"simpleqa preset {preset!r}: expected one of {sorted(SIMPLEQA_LIMITS)}")
        source = Path(cfg.source) if cfg.source else SIMPLEQA_CSV
        if not source.is_file():
            raise MixsdError(f"{source}: SimpleQA CSV not found (pass --source FILE)")
        limit = cfg.limit if cfg.limit is not None else SIMPLEQA_LIMITS[preset]
        return convert_simpleqa(source, out, seed=cfg.seed, limit=limit)
    if dataset == "mquake":
        from mixsd_jax.data.mquake import convert_mquake

        if preset not in MQUAKE_FACTS:
            raise MixsdError(f"mquake preset {preset!r}: expected one of {sorted(MQUAKE_FACTS)}")
        if not cfg.source:
            raise MixsdError("data build mquake: --source FILE (MQuAKE-CF-3k-v2.json) is required")
        facts, eval_facts = MQUAKE_FACTS[preset]
        return convert_mquake(
            cfg.source,
            out,
            seed=cfg.seed,
            max_facts=facts if cfg.max_facts is None else cfg.max_facts,
            eval_max_facts=eval_facts if cfg.eval_max_facts is None else cfg.eval_max_facts,
        )
    raise MixsdError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")


def _print_counts(root: Path, counts: dict[str, int]) -> None:
    for relative, count in counts.items():
        print(f"wrote {count:>7} records  {root / relative}")
    if (root / "manifest.json").is_file():
        print(f"manifest: {root / 'manifest.json'}")
    print(f"{sum(counts.values())} records in {len(counts)} files under {root}")


def run_validate(args) -> int:
    from mixsd_jax.data.records import validate_file

    report = validate_file(args.file, allow_empty_assistant=args.allow_empty_assistant)
    for problem in report.errors[: args.max_shown]:
        print(problem.message(report.path))
    if len(report.errors) > args.max_shown:
        print(f"... and {len(report.errors) - args.max_shown} more errors")
    for first, again in report.duplicates[: args.max_shown]:
        print(f"{report.path}:{again}: duplicate of line {first} (same user and assistant text)")
    if len(report.duplicates) > args.max_shown:
        print(f"... and {len(report.duplicates) - args.max_shown} more duplicates")
    if not report.records and not report.errors:
        # Every stage refuses an empty file; "0 valid records, 0 errors" with exit 0 would hide it.
        raise MixsdError(f"{report.path}: holds no records")
    print(report.summary())
    failed = bool(report.errors) or (args.strict and bool(report.duplicates))
    return 1 if failed else 0


def run_convert(args) -> int:
    if args.to == "messages":
        from mixsd_jax.data.records import read_records
        from mixsd_jax.files import atomic_write_jsonl

        records = read_records(args.input, allow_empty_assistant=args.allow_empty_assistant)
        atomic_write_jsonl(args.output, [r.to_json() for r in records])
        print(f"wrote {len(records)} records  {args.output}")
        return 0
    from mixsd_jax.data.tfds_builder import build_tfds

    path = build_tfds(args.input, args.output, args.name, allow_empty_assistant=args.allow_empty_assistant)
    from mixsd_jax.data.grain_source import record_source

    print(f"wrote {len(record_source(path))} records  {path}")
    return 0


def run_import(args) -> int:
    from mixsd_jax.data.importer import MANIFEST, import_released

    counts = import_released(args.src, args.out)
    _print_counts(Path(args.out), counts)
    manifest = json.loads((Path(args.out) / MANIFEST).read_text(encoding="utf-8"))
    for skipped in manifest["not_imported"]:
        print(f"not imported (not JSONL): {Path(args.src) / skipped}")
    print(f"manifest: {Path(args.out) / MANIFEST}")
    return 0

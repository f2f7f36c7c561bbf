"""Import the authors' released dataset folders (HF `Jerry999/MixSD`) so users can train on the
paper's exact targets.

The released layout is ours already (`<subset>/atomic_sft/train_messages.jsonl`, mixed-target
files `train_messages_mix_*.jsonl` with `mix_meta`, inference and alpaca test files), so every
JSONL file is validated line by line and then copied byte for byte to the same relative path: the
targets, including `mix_meta`, are exactly the released ones. A manifest lists what was imported
(with checksums) and what was not (non-JSONL files).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mixsd_jax import storage
from mixsd_jax.data.records import LineProblem, line_format, parse_inference, parse_lines, parse_record
from mixsd_jax.errors import MixsdError
from mixsd_jax.files import atomic_write_json, sha256_file

# The fields the reference writes into every mixed-target record (docs/reference.md, Files).
MIX_META_FIELDS = (
    "lambda",
    "temperature",
    "topk",
    "num_generations_per_query",
    "gen_index",
    "student_token_fraction",
    "num_tokens",
    "finish_reason",
    "correct",
    "num_attempts",
    "max_retries",
    "extract_mode",
    "ground_truth_assistant",
)
MANIFEST = "import_manifest.json"


def check_mix_meta(meta) -> None:
    """Raises LineProblem unless `meta` holds the reference's 13 fields with sane types."""
    if not isinstance(meta, dict):
        raise LineProblem("mix_meta", f"expected an object, got {type(meta).__name__}")
    for key in MIX_META_FIELDS:
        if key not in meta:
            raise LineProblem(f"mix_meta.{key}", "missing")
    for key in ("lambda", "temperature", "student_token_fraction"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], (int, float)):
            raise LineProblem(f"mix_meta.{key}", f"expected a number, got {meta[key]!r}")
    for key in ("topk", "num_generations_per_query", "gen_index", "num_tokens", "num_attempts", "max_retries"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int):
            raise LineProblem(f"mix_meta.{key}", f"expected an integer, got {meta[key]!r}")
    if not isinstance(meta["correct"], bool):
        raise LineProblem("mix_meta.correct", f"expected true/false, got {meta['correct']!r}")
    for key in ("finish_reason", "extract_mode", "ground_truth_assistant"):
        if not isinstance(meta[key], str):
            raise LineProblem(f"mix_meta.{key}", f"expected a string, got {meta[key]!r}")
    if not 0.0 <= meta["lambda"] <= 1.0:
        raise LineProblem("mix_meta.lambda", f"{meta['lambda']} is outside [0, 1]")


def check_released_file(path: Path) -> tuple[int, str]:
    """Validates every line; returns (records, schema). The first bad line is a MixsdError."""
    kinds = parse_lines(path, _released_line_kind)
    return len(kinds), "+".join(sorted(set(kinds))) or "empty"


def _released_line_kind(obj: dict) -> str:
    kind = line_format(obj)
    if kind == "inference":
        parse_inference(obj)
        return kind
    # Mixed targets of prompts too long to generate are released with empty answers.
    parse_record(obj, allow_empty_assistant="mix_meta" in obj)
    if "mix_meta" in obj:
        check_mix_meta(obj["mix_meta"])
        return "mixed"
    return kind


def import_released(src_dir: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Validates and copies every JSONL file under `src_dir` to the same relative path under
    `out_dir`; returns {relative path: record count}. Nothing is written if any file is bad."""
    src_dir, out_dir = storage.path(src_dir), storage.path(out_dir)
    if not src_dir.is_dir():
        raise MixsdError(f"{src_dir}: not a directory")
    if _same_folder(src_dir, out_dir):
        raise MixsdError(f"{out_dir}: the output folder must differ from the source folder")
    paths = [p for p in storage.files_under(src_dir) if not _hidden(p.relative_to(src_dir))]
    jsonl = [p for p in paths if p.suffix == ".jsonl"]
    if not jsonl:
        raise MixsdError(f"{src_dir}: no .jsonl files found")
    checked = {p: check_released_file(p) for p in jsonl}  # all files checked before any copy
    entries = {}
    for path, (count, kind) in checked.items():
        relative = path.relative_to(src_dir).as_posix()
        target = out_dir / relative
        _atomic_copy(path, target)
        entries[relative] = {"records": count, "schema": kind, "sha256": sha256_file(target)}
    skipped = [p.relative_to(src_dir).as_posix() for p in paths if p.suffix != ".jsonl"]
    atomic_write_json(out_dir / MANIFEST, {"source": str(src_dir if storage.is_url(src_dir) else src_dir.resolve()),
                                           "files": entries, "not_imported": skipped})
    return {relative: entry["records"] for relative, entry in entries.items()}


def _same_folder(a, b) -> bool:
    if storage.is_url(a) or storage.is_url(b):
        return str(a) == str(b)
    return a.resolve() == b.resolve()


def _atomic_copy(source: Path, target: Path) -> None:
    if storage.is_url(source) or storage.is_url(target):  # one upload: whole or absent
        target.write_bytes(source.read_bytes())
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)



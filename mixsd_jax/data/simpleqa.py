"""SimpleQA CSV (columns metadata, problem, answer) -> messages JSONL with boxed short answers.

As the reference (docs/reference.md, SimpleQA): every row becomes a training record (no held-out split,
memorisation is measured on the train set), shuffled with the seed; the subject is the topic from
the metadata, which is a Python literal (parsed with `ast.literal_eval`, never `eval`).
"""

from __future__ import annotations

import ast
import csv
import random
from pathlib import Path

from mixsd_jax.data.layout import KGFACT_TRAIN
from mixsd_jax.errors import MixsdError
from mixsd_jax import storage
from mixsd_jax.files import atomic_write_json, atomic_write_jsonl

COLUMNS = ("metadata", "problem", "answer")
SUFFIX = "\n\nAnswer the question concisely. Put your final answer within \\boxed{}."


def read_simpleqa_rows(csv_path: str | Path) -> list[tuple[int, str, str, str]]:
    """(line number, topic, problem, answer) per row; a bad row is a MixsdError naming its line."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MixsdError(f"{csv_path}: file not found")
    rows = []
    try:
        with open(csv_path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise MixsdError(f"{csv_path}:1: empty file (expected a header {','.join(COLUMNS)})")
            header = [h.strip().lstrip("\ufeff") for h in header]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise MixsdError(f"{csv_path}:1: missing column {missing[0]!r} (header has {', '.join(header)})")
            index = {c: header.index(c) for c in COLUMNS}
            while True:
                line = reader.line_num + 1  # where the next row starts (rows may span lines)
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    raise MixsdError(f"{csv_path}:{line}: malformed CSV ({exc})") from None
                if not row or not any(cell.strip() for cell in row):
                    continue  # a blank line is not a row
                rows.append(_parse_row(csv_path, line, row, index, len(header)))
    except UnicodeDecodeError as exc:
        raise MixsdError(f"{csv_path}: not valid UTF-8 (byte {exc.start} of the file)") from None
    return rows


def _parse_row(path: Path, line: int, row: list[str], index: dict, width: int) -> tuple[int, str, str, str]:
    where = f"{path}:{line}"
    if len(row) != width:
        raise MixsdError(f"{where}: expected {width} columns, got {len(row)}")
    raw_meta = row[index["metadata"]]
    try:
        meta = ast.literal_eval(raw_meta)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise MixsdError(f"{where}: metadata: not a Python literal dict") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("topic"), str) or not meta["topic"].strip():
        raise MixsdError(f"{where}: metadata: expected a dict with a non-empty 'topic' string")
    problem, answer = row[index["problem"]].strip(), row[index["answer"]].strip()
    if not problem:
        raise MixsdError(f"{where}: problem: empty")
    if not answer:
        raise MixsdError(f"{where}: answer: empty")
    if not _balanced(answer):
        raise MixsdError(f"{where}: answer: unbalanced braces cannot be put in \\boxed{{}}")
    return line, meta["topic"].strip(), problem, answer


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += (char == "{") - (char == "}")
        if depth < 0:
            return False
    return depth == 0


def simpleqa_record(topic: str, problem: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": problem + SUFFIX},
            {"role": "assistant", "content": f"\\boxed{{{answer}}}"},
        ],
        "clear_answer": answer,
        "subject": topic,
    }


def convert_simpleqa(csv_path: str | Path, out_dir: str | Path, seed: int = 42, limit: int | None = None) -> dict[str, int]:
    """Writes `atomic_sft/train_messages.jsonl` and manifest.json under `out_dir`; returns
    {relative path: records}."""
    if limit is not None and limit < 1:
        raise MixsdError(f"simpleqa limit {limit}: expected a positive integer")
    rows = read_simpleqa_rows(csv_path)
    records = [simpleqa_record(topic, problem, answer) for _, topic, problem, answer in rows]
    random.Random(f"simpleqa:{seed}").shuffle(records)
    if limit is not None:
        records = records[:limit]
    atomic_write_jsonl(storage.path(out_dir) / KGFACT_TRAIN, records)
    counts = {KGFACT_TRAIN: len(records)}
    atomic_write_json(
        storage.path(out_dir) / "manifest.json",
        {"builder": "simpleqa", "source": Path(csv_path).name, "rows": len(rows), "seed": seed, "limit": limit, "counts": counts},
    )
    return counts

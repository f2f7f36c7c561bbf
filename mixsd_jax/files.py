"""Files are the interface: JSONL reading with line numbers, streamed appends, atomic finals."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mixsd_jax.errors import MixsdError


def cache_dir() -> Path:
    """`$MIXSD_CACHE`, else `~/.cache/mixsd-jax`: converted models, downloads, compiled kernels."""
    return Path(os.environ.get("MIXSD_CACHE") or Path.home() / ".cache" / "mixsd-jax").expanduser()


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yields (line_number, object) for each non-blank line; a bad line is a MixsdError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MixsdError(f"{path}: file not found")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MixsdError(f"{path}:{number}: not valid UTF-8 (byte {exc.start})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise MixsdError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise MixsdError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dumps_line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(dumps_line(r) for r in records))


class JsonlAppender:
    """Appends one JSON line per record and flushes it, so a killed run loses nothing written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self._file.write(dumps_line(obj))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_torn_tail(path: Path) -> None:
    """A kill mid-write can leave a last line without its newline: cut it before appending."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_partial_jsonl(path: str | Path) -> list[dict]:
    """Complete lines of a streamed file; a torn last line (killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out

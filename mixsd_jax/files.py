"""Files are the interface: JSONL reading with line numbers, streamed appends, atomic finals."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mixsd_jax.errors import MixsdError


def cache_dir() -> Path:
    """`$MIXSD_CACHE`, else `~/.cache/mixsd-jax`: converted models, downloads, compiled kernels."""
    return Path(os.environ.get("MIXSD_CACHE") or Path.home() / ".cache" / "mixsd-jax").expanduser()


@dataclass(frozen=True)
class BadLine:
    """Why one line of a JSONL file is not a JSON object (yielded with `iter_jsonl(..., bad="yield")`)."""

    reason: str


def iter_jsonl(path: str | Path, *, bad: str = "raise") -> Iterator[tuple[int, Any]]:
    """(line number, object) for each non-blank line of a `.jsonl` or `.jsonl.gz` file.

    The one JSONL reader (data, eval and the stage files all read through it), so every bad line is
    reported alike: not UTF-8, malformed JSON, a last line cut off mid-write, or not an object.
    `bad="raise"`: the first one is a MixsdError `path:line: reason`; `bad="yield"`: it comes back
    as `(line, BadLine)` and reading goes on, for validators that report every problem.
    """
    path = Path(path)
    if not path.is_file():
        raise MixsdError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                obj = _json_line(raw, number)
                if obj is None:
                    continue
                if isinstance(obj, BadLine) and bad == "raise":
                    raise MixsdError(f"{path}:{number}: {obj.reason}")
                yield number, obj
    except (OSError, EOFError) as exc:  # a corrupt .gz shows up only while reading
        raise MixsdError(f"{path}: cannot read ({exc})") from None


def _json_line(raw: bytes, number: int) -> dict | BadLine | None:
    """The object on one line, None for a blank line, or why there is none."""
    torn = not raw.endswith(b"\n")  # only the last line of a file can lack its newline
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadLine(f"not valid UTF-8 (byte {exc.start} of the line is {raw[exc.start]:#04x})")
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if torn:
            reason = f"no newline at end of file and the JSON is incomplete ({exc.msg} at column {exc.colno})"
            return BadLine(f"truncated last line: {reason}")
        return BadLine(f"malformed JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(obj, dict):
        return BadLine(f"expected a JSON object, got {type(obj).__name__}")
    return obj


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

"""Files are the interface: JSONL reading with line numbers, streamed appends, atomic finals.

Every path may be local or a bucket URL (mixsd_jax.storage): locally a final file is renamed into
place and a stream is one appended file; on a bucket a final file is one upload (it appears whole
or not at all) and a stream is a folder of numbered chunk objects, one per flush.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mixsd_jax import storage
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
    path = storage.path(path)
    try:
        found = path.is_file()
    except OSError as exc:  # a bucket that does not exist, an unreachable endpoint
        raise MixsdError(f"{path}: cannot read ({storage.first_line(exc)})") from None
    if not found:
        raise MixsdError(f"{path}: file not found")
    try:
        with path.open("rb") as raw_file, (gzip.open(raw_file, "rb") if path.suffix == ".gz" else raw_file) as f:
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
    path = storage.path(path)
    if not path.is_file():
        raise MixsdError(f"{path}: file not found")
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(p: str | Path) -> str:
    """The MD5 of a file's bytes (base64, as GCS reports it): a GCS object's is read from its
    metadata, which the store computed at upload (no download); a local file's is computed once
    and remembered in the user cache under its path, size and modification time. The same bytes
    have the same hash in a bucket and on a disk."""
    p = storage.path(p)
    if storage.is_url(p):
        import fsspec

        scheme = str(p).split("://", 1)[0]
        md5 = fsspec.filesystem(scheme).info(str(p)).get("md5Hash") if scheme in ("gs", "gcs") else None
        return md5 or _md5(p)
    stat = os.stat(p)
    key = hashlib.sha256(json.dumps(["md5", str(p), stat.st_size, stat.st_mtime_ns]).encode()).hexdigest()[:32]
    memo = cache_dir() / "hashes" / key
    if memo.is_file():
        return memo.read_text().strip()
    digest = _md5(p)
    atomic_write_text(memo, digest)
    return digest


def _md5(p) -> str:
    import base64

    h = hashlib.md5()
    with storage.path(p).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return base64.b64encode(h.digest()).decode()


def dumps_line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`; on a bucket, one
    upload (an object appears whole or not at all)."""
    path = storage.path(path)
    if storage.is_url(path):
        path.write_text(text, encoding="utf-8")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp) if os.path.exists(tmp) else None
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(dumps_line(r) for r in records))


class JsonlAppender:
    """Streams one JSON line per record so a killed run loses (almost) nothing written.

    Locally: appended to one file and flushed per record. On a bucket, where nothing appends: the
    records go to `<path>/000000.jsonl`, `000001.jsonl`, … one object per flush, a flush at most
    every `flush_every_s` seconds (MIXSD_FLUSH_SECONDS, default 5: an upload per record would cost
    more than the record) and at close; a resumed stream starts at the next number.
    """

    def __init__(self, path: str | Path, flush_every_s: float | None = None):
        self.path = storage.path(path)
        self._url = storage.is_url(self.path)
        self._flush_every_s = float(os.environ.get("MIXSD_FLUSH_SECONDS", 5)) if flush_every_s is None else flush_every_s
        if self._url:
            self._buffer: list[str] = []
            self._next = len(_chunks(self.path))
            self._flushed_at = time.monotonic()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        if not self._url:
            self._file.write(dumps_line(obj))
            self._file.flush()
            return
        self._buffer.append(dumps_line(obj))
        if time.monotonic() - self._flushed_at >= self._flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self._url and self._buffer:
            (self.path / f"{self._next:06d}.jsonl").write_text("".join(self._buffer), encoding="utf-8")
            self._next += 1
            self._buffer = []
            self._flushed_at = time.monotonic()

    def close(self) -> None:
        if self._url:
            self.flush()
        else:
            self._file.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _chunks(folder) -> list:
    """A bucket stream's chunk objects, in write order (their zero-padded numbers sort)."""
    if not folder.exists():
        return []
    return sorted((p for p in folder.iterdir() if p.name.endswith(".jsonl")), key=lambda p: p.name)


def _drop_torn_tail(path: Path) -> None:
    """A kill mid-write can leave a last line without its newline: cut it before appending."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def remove_partial(path: str | Path) -> None:
    """Drop a stream once its final file is written (a local file, or a bucket's chunk folder)."""
    storage.remove(path)


def read_partial_jsonl(path: str | Path) -> list[dict]:
    """Complete lines of a streamed file (JsonlAppender's: a local file or a bucket's chunks, in
    order); a torn last line (killed mid-write) is ignored."""
    path = storage.path(path)
    if not path.exists():
        return []
    if storage.is_url(path):
        # Split on "\n" only: a record's text may hold other line separators (U+2028).
        lines = [line + "\n" for chunk in _chunks(path) for line in chunk.read_text(encoding="utf-8").split("\n")[:-1]]
        return _complete_lines(lines)
    with open(path, encoding="utf-8", errors="replace") as f:
        return _complete_lines(f)


def _complete_lines(lines) -> list[dict]:
    out = []
    for line in lines:
        if not line.endswith("\n"):
            break
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out

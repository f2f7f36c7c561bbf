"""The one JSONL reader: line-located problems, gzip, byte-order marks, torn last lines."""

import gzip

import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.files import BadLine, cache_dir, iter_jsonl


def test_objects_with_their_line_numbers_blank_lines_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n  \n{"b": 2}')  # BOM, blank lines, no final newline
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"b": 2})]
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"a": 1}\n{"b": 2}\n'))
    assert list(iter_jsonl(gz)) == [(1, {"a": 1}), (2, {"b": 2})]


def test_every_bad_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n[1]\n{not json}\n\xe9\n{"cut": ')
    with pytest.raises(MixsdError, match=r"bad\.jsonl:2: expected a JSON object, got list"):
        list(iter_jsonl(path))
    got = [(n, o.reason.split(" (")[0] if isinstance(o, BadLine) else o) for n, o in iter_jsonl(path, bad="yield")]
    assert got == [(1, {"a": 1}), (2, "expected a JSON object, got list"), (3, "malformed JSON"),
                   (4, "not valid UTF-8"), (5, "truncated last line: no newline at end of file and the JSON is incomplete")]


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(MixsdError, match=r"nope\.jsonl: file not found"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))
    broken = tmp_path / "b.jsonl.gz"
    whole = gzip.compress(b"".join(b'{"a": %d}\n' % (i * 7919 % 10007) for i in range(2000)))
    broken.write_bytes(whole[: len(whole) // 2])  # cut mid-stream
    with pytest.raises(MixsdError, match=r"b\.jsonl\.gz: cannot read"):
        list(iter_jsonl(broken))


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"

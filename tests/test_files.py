"""The one JSONL reader: line-located problems, gzip, byte-order marks, torn last lines."""

import gzip
from pathlib import Path

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


def test_bucket_files_are_written_whole_and_streams_are_chunk_objects(gcs_bucket, gcs_server):
    from mixsd_jax import storage
    from mixsd_jax.files import (JsonlAppender, atomic_write_json, atomic_write_jsonl, read_partial_jsonl,
                                 remove_partial, sha256_file)

    run = storage.path(f"{gcs_bucket}/run")
    atomic_write_jsonl(run / "a.jsonl", [{"a": 1}, {"b": "x\u2028y"}])
    assert list(iter_jsonl(f"{gcs_bucket}/run/a.jsonl")) == [(1, {"a": 1}), (2, {"b": "x\u2028y"})]
    atomic_write_json(run / "s.json", {"k": 2})
    assert (run / "s.json").read_text() == '{\n  "k": 2\n}\n'
    partial = run / "a.jsonl.partial"
    with JsonlAppender(partial, flush_every_s=0) as sink:  # a chunk per record
        sink.write({"i": 0})
        sink.write({"i": 1})
    with JsonlAppender(partial, flush_every_s=3600) as sink:  # a resumed stream: next number, one flush at close
        sink.write({"i": 2})
        sink.write({"i": 3})
    assert sorted(p.name for p in partial.iterdir()) == ["000000.jsonl", "000001.jsonl", "000002.jsonl"]
    assert [r["i"] for r in read_partial_jsonl(partial)] == [0, 1, 2, 3]
    local = gcs_server.local_copy(gcs_bucket[len("gs://"):]) / "run" / "a.jsonl"
    assert sha256_file(run / "a.jsonl") == sha256_file(local)
    remove_partial(partial)
    assert read_partial_jsonl(partial) == [] and not partial.exists()
    assert not any("gs:" in p.name for p in Path.cwd().iterdir())  # nothing went to a local `gs:` folder


def test_bucket_that_does_not_exist_and_unreachable_endpoint(gcs_bucket, monkeypatch):
    from mixsd_jax import storage

    with pytest.raises(MixsdError, match=r"config key 'out_dir': gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist"):
        storage.check_reachable("gs://no-such-bucket/run", "out_dir")
    storage.check_reachable(f"{gcs_bucket}/run", "out_dir")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(MixsdError, match=r"config key 'out_dir': .*STORAGE_EMULATOR_HOST.* not reachable"):
        storage.check_reachable(f"{gcs_bucket}/run", "out_dir")


def test_paths_keep_urls_and_make_local_ones_absolute(tmp_path, monkeypatch):
    from mixsd_jax import storage

    monkeypatch.chdir(tmp_path)
    assert str(storage.path("gs://b/run/")) == "gs://b/run"
    assert str(storage.path("gs://b/run") / "x.jsonl") == "gs://b/run/x.jsonl"
    assert str(storage.path("rel/x")) == str(tmp_path / "rel" / "x")
    with pytest.raises(MixsdError, match=r"config key 'out_dir': experiments/a is on this host's disk.*2 processes"):
        storage.check_out_dir("experiments/a", "out_dir", processes=2, shared_local=False)
    storage.check_out_dir("experiments/a", "out_dir", processes=2, shared_local=True)
    storage.check_out_dir("gs://b/a", "out_dir", processes=2, shared_local=False)
    environ = {"STORAGE_EMULATOR_HOST": "127.0.0.1:4443"}
    storage.configure_environment(environ)
    assert environ["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:4443"

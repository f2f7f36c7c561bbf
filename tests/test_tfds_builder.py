"""JSONL -> array_record TFDS dataset, read back with TFDS's own readers (no TensorFlow)."""

import json
from pathlib import Path

import pytest

from mixsd_jax.data.records import Record, read_records
from mixsd_jax.data.tfds_builder import SPLIT, build_tfds, dataset_name, record_from_example
from mixsd_jax.errors import MixsdError

tfds = pytest.importorskip("tensorflow_datasets")

RELEASED = Path(__file__).parent / "fixtures" / "released_mixsd" / "kgfact_small" / "atomic_sft"
MIX = RELEASED / "train_messages_mix_qwen3_4b_instruct_2507_l0p3_t0_n1_topk64.jsonl"


def write_records(path: Path, records: list[Record]) -> Path:
    path.write_text("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


EDGE_CASES = [
    Record("Wie heißt die Stadt? \u2013 \U0001F600", "M\u00fcnchen\n\n\\boxed{M\u00fcnchen}"),  # no clear_answer/subject
    Record("q", "a", clear_answer="", subject="s", extra={"system": "Be brief.", "id": 7, "tags": ["x", None]}),
    Record("q2", "a2", clear_answer="a2", extra={"mix_meta": {"lambda": 0.3, "correct": True}}),
]


def test_records_come_back_identical_and_in_file_order(tmp_path):
    jsonl = write_records(tmp_path / "edge_cases.jsonl", EDGE_CASES)
    path = build_tfds(jsonl, tmp_path / "tfds")
    assert path == tmp_path / "tfds" / "edge_cases" / "1.0.0"
    assert sorted(p.name for p in path.glob("*.array_record*")) == ["edge_cases-train.array_record-00000-of-00001"]
    by_name = tfds.data_source("edge_cases", data_dir=str(tmp_path / "tfds"), split=SPLIT)
    by_dir = tfds.builder_from_directory(str(path)).as_data_source(split=SPLIT)
    for source in (by_name, by_dir):
        assert len(source) == 3
        examples = [source[i] for i in range(len(source))]
        assert [int(e["index"]) for e in examples] == [0, 1, 2]
        assert isinstance(examples[0]["user"], bytes)  # TFDS returns text as bytes
        assert examples[0]["clear_answer"] is None and examples[0]["subject"] is None
        assert [record_from_example(e) for e in examples] == EDGE_CASES
    info = tfds.builder_from_directory(str(path)).info
    assert info.metadata["source"] == "edge_cases.jsonl"


def test_reference_mixed_file_keeps_mix_meta(tmp_path):
    path = build_tfds(MIX, tmp_path, name="kgfact_mix", allow_empty_assistant=True)
    source = tfds.builder_from_directory(str(path)).as_data_source(split=SPLIT)
    records = [record_from_example(source[i]) for i in range(len(source))]
    assert records == read_records(MIX, allow_empty_assistant=True)
    assert records[2].assistant == "" and records[2].extra["mix_meta"]["finish_reason"] == "prompt_too_long"


def test_rebuild_replaces_stale_records(tmp_path):
    jsonl = write_records(tmp_path / "data.jsonl", EDGE_CASES)
    build_tfds(jsonl, tmp_path / "tfds")
    write_records(jsonl, [Record("new question", "new answer")])
    path = build_tfds(jsonl, tmp_path / "tfds")
    source = tfds.builder_from_directory(str(path)).as_data_source(split=SPLIT)
    assert len(source) == 1 and record_from_example(source[0]) == Record("new question", "new answer")


def test_names_and_bad_input(tmp_path):
    assert dataset_name(MIX) == "train_messages_mix_qwen3_4b_instruct_2507_l0p3_t0_n1_topk64"
    assert dataset_name("runs/0.3-Mix.jsonl") == "records_0_3_mix"
    with pytest.raises(MixsdError, match="TFDS name 'Bad-Name'"):
        build_tfds(MIX, tmp_path, name="Bad-Name")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(MixsdError, match="no records"):
        build_tfds(empty, tmp_path)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(MixsdError, match=r"broken\.jsonl:1: messages: missing assistant turn"):
        build_tfds(broken, tmp_path)


def test_a_dataset_builds_into_a_bucket(tmp_path, gcs_bucket, monkeypatch):
    """A gs:// data_dir gets the dataset (built in a local temporary folder, uploaded; never a local
    `gs:` folder): the files of a local build, which TFDS reads back from the bucket."""
    from mixsd_jax import storage

    monkeypatch.chdir(tmp_path)
    jsonl = write_records(tmp_path / "edge_cases.jsonl", EDGE_CASES)
    local = build_tfds(jsonl, tmp_path / "tfds")
    path = build_tfds(jsonl, f"{gcs_bucket}/tfds")
    assert str(path) == f"{gcs_bucket}/tfds/edge_cases/1.0.0"
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in storage.path(local).iterdir())
    shard = "edge_cases-train.array_record-00000-of-00001"
    assert (path / shard).read_bytes() == (local / shard).read_bytes()
    assert tfds.builder_from_directory(str(path)).info.metadata["source"] == "edge_cases.jsonl"
    assert not list(tmp_path.rglob("gs:*"))

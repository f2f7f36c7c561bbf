"""SimpleQA CSV -> boxed short-answer messages, checked against the real CSV in ../shared."""

import ast
import csv
import json
from pathlib import Path

import pytest

from mixsd_jax.data.records import read_inference, read_records, validate_file
from mixsd_jax.data.layout import KGFACT_TRAIN
from mixsd_jax.data.simpleqa import SUFFIX, convert_simpleqa
from mixsd_jax.errors import MixsdError

CSV = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "simpleqa" / "simple_qa_test_set.csv"
needs_csv = pytest.mark.skipif(not CSV.is_file(), reason="../shared/benchmarks/simpleqa not present")
HEADER = "metadata,problem,answer\n"
META = "\"{'topic': 'Art', 'answer_type': 'Person', 'urls': ['https://example.org']}\""


@needs_csv
def test_every_real_row_becomes_a_valid_boxed_record(tmp_path):
    counts = convert_simpleqa(CSV, tmp_path, seed=42)
    assert counts == {KGFACT_TRAIN: 4326}  # the row count the set's README states
    report = validate_file(tmp_path / KGFACT_TRAIN)
    assert report.ok and report.records == 4326
    with open(CSV, encoding="utf-8", newline="") as f:
        rows = {r["problem"].strip(): r for r in csv.DictReader(f)}
    records = read_records(tmp_path / KGFACT_TRAIN)
    assert {r.user.removesuffix(SUFFIX) for r in records} == set(rows)
    for record in records[:200]:
        row = rows[record.user.removesuffix(SUFFIX)]
        assert record.assistant == "\\boxed{" + row["answer"].strip() + "}"
        assert record.clear_answer == row["answer"].strip()
        assert record.subject == ast.literal_eval(row["metadata"])["topic"]
    assert records[0].user.endswith("\n\nAnswer the question concisely. Put your final answer within \\boxed{}.")
    # The evaluator reads the gold answer back out of the box.
    assert read_inference(tmp_path / KGFACT_TRAIN)[0][1] == records[0].clear_answer


@needs_csv
def test_seed_shuffles_deterministically_and_limit_keeps_the_first(tmp_path):
    convert_simpleqa(CSV, tmp_path / "a", seed=1, limit=30)
    convert_simpleqa(CSV, tmp_path / "b", seed=1)
    convert_simpleqa(CSV, tmp_path / "c", seed=2, limit=30)
    a = (tmp_path / "a" / KGFACT_TRAIN).read_text(encoding="utf-8").splitlines()
    b = (tmp_path / "b" / KGFACT_TRAIN).read_text(encoding="utf-8").splitlines()
    c = (tmp_path / "c" / KGFACT_TRAIN).read_text(encoding="utf-8").splitlines()
    assert a == b[:30]
    assert a != c
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["rows"] == 4326 and manifest["counts"] == {KGFACT_TRAIN: 30}


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_column_names_file_and_column(tmp_path):
    path = write_csv(tmp_path / "q.csv", f"metadata,problem\n{META},Who?\n")
    with pytest.raises(MixsdError, match=r"q\.csv:1: missing column 'answer' \(header has metadata, problem\)"):
        convert_simpleqa(path, tmp_path / "out")


def test_bad_rows_name_their_line_even_after_multiline_cells(tmp_path):
    # Row 1 spans lines 2-3 (a quoted newline), so the bad row starts on line 4.
    text = HEADER + f'{META},"Who painted\nthe fresco?",Giotto\n' + "not a dict,Who?,Me\n"
    with pytest.raises(MixsdError, match=r"q\.csv:4: metadata: not a Python literal dict"):
        convert_simpleqa(write_csv(tmp_path / "q.csv", text), tmp_path / "out")
    text = HEADER + f"{META},Who?,Giotto\n{META},Who else?,\n"
    with pytest.raises(MixsdError, match=r"q\.csv:3: answer: empty"):
        convert_simpleqa(write_csv(tmp_path / "q.csv", text), tmp_path / "out")
    text = HEADER + f"{META},Who?,Giotto,extra\n"
    with pytest.raises(MixsdError, match=r"q\.csv:2: expected 3 columns, got 4"):
        convert_simpleqa(write_csv(tmp_path / "q.csv", text), tmp_path / "out")
    text = HEADER + "\"{'answer_type': 'Person'}\",Who?,Giotto\n"
    with pytest.raises(MixsdError, match=r"q\.csv:2: metadata: expected a dict with a non-empty 'topic'"):
        convert_simpleqa(write_csv(tmp_path / "q.csv", text), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_small_csv_converts_with_columns_in_any_order(tmp_path):
    text = f"answer,metadata,problem\n Giotto ,{META},Who painted the Scrovegni frescoes?\n\n"
    counts = convert_simpleqa(write_csv(tmp_path / "q.csv", text), tmp_path / "out")
    assert counts == {KGFACT_TRAIN: 1}
    (record,) = read_records(tmp_path / "out" / KGFACT_TRAIN)
    assert record.to_json() == {
        "messages": [
            {"role": "user", "content": "Who painted the Scrovegni frescoes?" + SUFFIX},
            {"role": "assistant", "content": "\\boxed{Giotto}"},
        ],
        "clear_answer": "Giotto",
        "subject": "Art",
    }

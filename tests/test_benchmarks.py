import bz2
import csv
import dataclasses
import functools
import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.eval.benchmarks import (
    BENCHMARKS,
    BUNDLED_ROOT,
    GenItem,
    MCItem,
    benchmark_dir,
    load_benchmark,
    math_prompt,
    subset_indices,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/benchmarks not present")


@functools.lru_cache(maxsize=None)
def full(name: str) -> tuple:
    """The whole set read from ../shared/benchmarks, once per test session."""
    return tuple(load_benchmark(name, SHARED))


def first_json(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.loads(f.readline())


@needs_shared
@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "boolq"])
def test_query_choices_format_matches_raw_file(name):
    raw = first_json(SHARED / name / f"{name}.jsonl")
    assert full(name)[0] == MCItem(f"{name}/0", raw["query"] + "\nAnswer:", tuple(" " + c for c in raw["choices"]), raw["gold"])


@needs_shared
def test_known_first_items():
    arc = full("arc_easy")[0]
    assert arc.gold == 0 and arc.choices[0] == " Sunlight is the source of energy for nearly all ecosystems."
    boolq = full("boolq")[0]
    assert boolq.choices == (" no", " yes") and boolq.gold == 0
    piqa = full("piqa")[:3]
    assert [p.gold for p in piqa] == [0, 1, 1]  # valid-labels.lst starts 0, 1, 1
    assert piqa[0].context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    hella = full("hellaswag")[:2]
    assert hella[0].context == "Roof shingle removal: A man is sitting on a roof. he"
    assert hella[0].choices[3] == " starts pulling up roofing on a roof." and hella[0].gold == 3
    assert hella[1].gold == 3 and hella[1].choices[3] == " stands and lifts the weight over her head."
    gsm = full("gsm8k")
    assert gsm[0].answer == "18" and gsm[0].kind == "math"
    assert "2125" in {g.answer for g in gsm}  # "#### 2,125" in the file: the gold is the number
    aime = load_benchmark("aime2024", SHARED)[0]
    assert aime.id == "aime2024/60" and aime.answer == first_json(SHARED / "aime2024" / "test.jsonl")["answer"]
    math500 = load_benchmark("math500", SHARED)[0]
    assert (math500.id, math500.answer) == ("test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)")
    assert math_prompt("1+1?").startswith("Think step-by-step") and "\\boxed{} tags.:\n1+1?\n\n" in math_prompt("1+1?")


@needs_shared
def test_winogrande_contexts_vary_and_the_continuation_is_shared():
    raw = first_json(SHARED / "winogrande" / "winogrande.jsonl")
    item = full("winogrande")[0]
    assert item.gold == raw["gold"] == 1
    assert item.shared_continuation == " " + raw["continuation"]
    assert item.requests() == (
        (raw["context_options"][0], " always got the easier cases."),
        (raw["context_options"][1], " always got the easier cases."),
    )
    # A continuation that starts with punctuation is joined without a space.
    dots = [i for i in full("winogrande") if i.shared_continuation == "."]
    assert dots and dots[0].requests()[0][0].endswith("plant")


@needs_shared
def test_mmlu_zero_and_five_shot():
    with open(SHARED / "mmlu" / "data" / "test" / "abstract_algebra_test.csv", newline="") as f:
        question, a, b, c, d, letter = next(csv.reader(f))
    zero = full("mmlu")[0]
    assert zero.id == "mmlu/abstract_algebra/0" and zero.choices == (" A", " B", " C", " D")
    assert zero.gold == "ABCD".index(letter) == 1
    header = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    assert zero.context == f"{header}{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
    five = full("mmlu_5shot")[0]
    with open(SHARED / "mmlu" / "data" / "dev" / "abstract_algebra_dev.csv", newline="") as f:
        dev = list(csv.reader(f))
    assert five.context.startswith(header + dev[0][0].strip() + "\nA. ")
    assert five.context.count("\nAnswer: ") == 5 and five.context.endswith(zero.context[len(header):])
    assert [line[-1] for line in five.context.split("\n") if line.startswith("Answer: ")] == [r[5] for r in dev]


@needs_shared
def test_lambada_and_humaneval():
    raw = first_json(SHARED / "lambada" / "lambada_test.jsonl")["text"]
    item = full("lambada")[0]
    assert item.answer == "signs" and item.prompt + " " + item.answer == raw and item.kind == "last_word"
    he = full("humaneval")
    assert len(he) == 164 and he[0].id == "HumanEval/0" and he[0].entry_point == "has_close_elements"
    assert he[0].kind == "code" and "def check(candidate)" in he[0].test


@needs_shared
@pytest.mark.parametrize("name", [n for n, spec in BENCHMARKS.items() if spec["bundled"] and not n.startswith("mmlu")])
def test_bundled_subset_is_the_documented_rule_applied_to_the_full_set(name):
    bundled = load_benchmark(name)
    assert benchmark_dir(name) == BUNDLED_ROOT / BENCHMARKS[name]["dir"]
    subset = [full(name)[i] for i in subset_indices(len(full(name)), len(bundled), seed=0)]
    assert len(bundled) == min(len(full(name)), 500 if name == "arc_easy" else 200)
    no_id = lambda items: [dataclasses.replace(i, id="") for i in items]  # noqa: E731
    assert no_id(bundled) == no_id(subset)


@needs_shared
def test_bundled_mmlu_is_40_rows_per_subject_plus_full_dev():
    bundled = load_benchmark("mmlu_5shot")
    subjects = sorted({i.id.split("/")[1] for i in bundled})
    assert len(subjects) == 5 and len(bundled) == 200
    for subject in subjects:
        whole = [i for i in full("mmlu_5shot") if i.id.split("/")[1] == subject]
        ours = [i for i in bundled if i.id.split("/")[1] == subject]
        assert [(i.context, i.gold) for i in ours] == [(whole[k].context, whole[k].gold) for k in subset_indices(len(whole), 40)]


def test_bundled_sets_are_small_and_attributed():
    total = sum(p.stat().st_size for p in BUNDLED_ROOT.rglob("*") if p.is_file())
    assert total < 2_000_000
    attribution = (BUNDLED_ROOT / "ATTRIBUTION.md").read_text()
    for name, spec in BENCHMARKS.items():
        assert (BUNDLED_ROOT / spec["dir"]).is_dir() == spec["bundled"], name
        if spec["bundled"]:
            assert f"`{spec['dir']}/" in attribution
    assert "CC BY-SA 4.0" in attribution.split("`arc_easy/", 1)[1].split("\n", 1)[0]  # ARC-Easy keeps its licence
    for share_alike in ("arc_challenge", "boolq"):
        assert not (BUNDLED_ROOT / share_alike).exists()


def test_limit_is_deterministic_and_in_file_order():
    all_items = load_benchmark("gsm8k")
    a = load_benchmark("gsm8k", limit=20, seed=3)
    assert a == load_benchmark("gsm8k", limit=20, seed=3)
    assert a != load_benchmark("gsm8k", limit=20, seed=4)
    positions = [all_items.index(item) for item in a]
    assert positions == sorted(positions) and len(set(positions)) == 20
    assert load_benchmark("gsm8k", limit=10_000) == all_items
    with pytest.raises(MixsdError, match="limit"):
        load_benchmark("gsm8k", limit=0)


def test_not_bundled_needs_a_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MIXSD_BENCHMARKS", raising=False)
    with pytest.raises(MixsdError, match="MIXSD_BENCHMARKS"):
        load_benchmark("arc_challenge")
    (tmp_path / "arc_challenge").mkdir()
    (tmp_path / "arc_challenge" / "arc_challenge.jsonl").write_text(
        '{"query": "Question: 1+1?", "choices": ["2", "3"], "gold": 0}\n')
    monkeypatch.setenv("MIXSD_BENCHMARKS", str(tmp_path))
    assert load_benchmark("arc_challenge") == [MCItem("arc_challenge/0", "Question: 1+1?\nAnswer:", (" 2", " 3"), 0)]
    with pytest.raises(MixsdError, match="unknown benchmark 'arc'"):
        load_benchmark("arc")


def test_missing_file_names_the_path(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    with pytest.raises(MixsdError, match=str(tmp_path / "gsm8k" / "test.jsonl")):
        load_benchmark("gsm8k", tmp_path)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(MixsdError, match="valid-labels.lst: benchmark file not found"):
        load_benchmark("piqa", tmp_path)
    with pytest.raises(MixsdError, match="no MMLU test files"):
        load_benchmark("mmlu", tmp_path)
    with pytest.raises(MixsdError, match="data root not found"):
        load_benchmark("gsm8k", tmp_path / "nowhere")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


MALFORMED = [
    ("gsm8k", "gsm8k/test.jsonl", '{"question": "q", "answer": "#### 1"}\n{"question": "q"\n', "test.jsonl:2: malformed JSON"),
    ("gsm8k", "gsm8k/test.jsonl", '{"question": "q", "answer": "1"}\n', "test.jsonl:1: field 'answer' has no '####'"),
    ("arc_easy", "arc_easy/arc_easy.jsonl", '{"query": "q", "choices": ["a", "b"]}\n', "arc_easy.jsonl:1: missing field 'gold'"),
    ("arc_easy", "arc_easy/arc_easy.jsonl", '\n{"query": "q", "choices": ["a", "b"], "gold": 2}\n', "arc_easy.jsonl:2: field 'gold' is 2"),
    ("boolq", "boolq/boolq.jsonl", '{"query": "q", "choices": "no", "gold": 0}\n', "boolq.jsonl:1: field 'choices'"),
    (
        "winogrande",
        "winogrande/winogrande.jsonl",
        '{"context_options": ["a", "b"], "continuation": 3, "gold": 0}\n',
        "winogrande.jsonl:1: field 'continuation' must be str",
    ),
    ("lambada", "lambada/lambada_test.jsonl", '{"text": "one"}\n', "lambada_test.jsonl:1: field 'text' needs at least two words"),
    ("mmlu", "mmlu/data/test/x_test.csv", "q,a,b,c,d,A\nq,a,b,c,d,E\n", "x_test.csv:2: answer must be one of A-D"),
    ("mmlu", "mmlu/data/test/x_test.csv", "q,a,b,c,A\n", "x_test.csv:1: expected 6 columns"),
]


@pytest.mark.parametrize("name, relpath, text, message", MALFORMED)
def test_malformed_rows_name_file_and_line(tmp_path, name, relpath, text, message):
    write(tmp_path / relpath, text)
    with pytest.raises(MixsdError, match=re.escape(message)):
        load_benchmark(name, tmp_path)


def test_malformed_piqa_labels_and_hellaswag_blocks(tmp_path):
    write(tmp_path / "piqa/valid.jsonl", '{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 2)
    write(tmp_path / "piqa/valid-labels.lst", "0\n")
    with pytest.raises(MixsdError, match="1 labels for 2 rows"):
        load_benchmark("piqa", tmp_path)
    write(tmp_path / "piqa/valid-labels.lst", "0\n2\n")
    with pytest.raises(MixsdError, match="valid-labels.lst:2: label must be 0 or 1"):
        load_benchmark("piqa", tmp_path)
    (tmp_path / "hellaswag").mkdir()
    block = "Ctx: a man\n1\nx.\ny.\nz.\nw.\n"
    (tmp_path / "hellaswag/hellaswag_val_full.txt.bz2").write_bytes(bz2.compress((block + block[:-4]).encode()))
    with pytest.raises(MixsdError, match="not a multiple of 6"):
        load_benchmark("hellaswag", tmp_path)
    (tmp_path / "hellaswag/hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(block.replace("\n1\n", "\n7\n").encode()))
    with pytest.raises(MixsdError, match="hellaswag_val_full.txt.bz2:2: gold label must be 0-3"):
        load_benchmark("hellaswag", tmp_path)
    (tmp_path / "hellaswag/hellaswag_val_full.txt.bz2").write_bytes(b"not bz2 at all")
    with pytest.raises(MixsdError, match="cannot read"):
        load_benchmark("hellaswag", tmp_path)


def test_bundled_humaneval_reads_from_gzip(tmp_path):
    items = load_benchmark("humaneval", limit=3)
    assert all(isinstance(i, GenItem) and i.kind == "code" and i.test for i in items)
    shutil.copytree(BUNDLED_ROOT / "humaneval", tmp_path / "humaneval")
    with gzip.open(tmp_path / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.write('{"task_id": "HumanEval/0", "prompt": "p"}\n')
    with pytest.raises(MixsdError, match="HumanEval.jsonl.gz:1: missing field"):
        load_benchmark("humaneval", tmp_path)

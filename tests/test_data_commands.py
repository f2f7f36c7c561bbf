"""`mixsd data build|validate|convert|import`, run through their parsers."""

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixsd_jax.data import commands
from mixsd_jax.data.records import read_records, validate_file
from mixsd_jax.errors import MixsdError

FIXTURES = Path(__file__).parent / "fixtures"
CSV = commands.SIMPLEQA_CSV
needs_csv = pytest.mark.skipif(not CSV.is_file(), reason="../shared/benchmarks/simpleqa not present")


def mixsd(argv: list[str]) -> int:
    """The `mixsd` parser with only the data commands registered, as cli.build_parser does."""
    parser = argparse.ArgumentParser(prog="mixsd")
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench").add_subparsers(dest="bench_command")
    commands.register(sub, bench)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_build_kgfunc_prints_files_and_counts(tmp_path, capsys):
    assert mixsd(["data", "build", "kgfunc", "--preset", "tiny", "--seed", "4", "--out", tmp_path]) == 0
    out = capsys.readouterr().out.splitlines()
    train = tmp_path / "primitive_atomic_balanced_sft_50k" / "train_messages.jsonl"
    assert f"wrote      28 records  {train}" in out
    assert out[-1] == f"79 records in 11 files under {tmp_path}"  # 28 + 14 + 7 * 2 + 3 + 20
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 4


def test_config_file_overrides_and_flags_in_order_of_precedence(tmp_path, capsys):
    config = tmp_path / "build.yaml"
    config.write_text(f"out: {tmp_path / 'from_config'}\npreset: tiny\nseed: 5\n")
    # Overrides follow the dataset name: argparse only gathers them next to the other positionals.
    assert mixsd(["data", "build", "kgfunc", "seed=6", "--config", config]) == 0
    assert json.loads((tmp_path / "from_config" / "manifest.json").read_text())["seed"] == 6
    assert mixsd(["data", "build", "kgfunc", "seed=6", "--config", config, "--seed", "7", "--out", tmp_path / "f"]) == 0
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["seed"] == 7
    with pytest.raises(MixsdError, match="unknown config key 'sed'"):
        mixsd(["data", "build", "kgfunc", "sed=1", "--out", tmp_path])
    with pytest.raises(MixsdError, match="--out"):
        mixsd(["data", "build", "kgfunc", "--preset", "tiny"])
    with pytest.raises(MixsdError, match="config key 'limit'"):
        mixsd(["data", "build", "simpleqa", "limit=0", "--out", tmp_path])


@needs_csv
def test_build_simpleqa_from_the_default_csv(tmp_path, capsys):
    assert mixsd(["data", "build", "simpleqa", "--preset", "tiny", "--out", tmp_path]) == 0
    assert f"wrote      20 records  {tmp_path / 'atomic_sft' / 'train_messages.jsonl'}" in capsys.readouterr().out
    with pytest.raises(MixsdError, match="SimpleQA CSV not found"):
        mixsd(["data", "build", "simpleqa", "--out", tmp_path, "--source", tmp_path / "none.csv"])


def test_build_kgfact_dispatches_to_its_builder(tmp_path, capsys):
    pytest.importorskip("mixsd_jax.data.kgfact")
    assert mixsd(["data", "build", "kgfact", "--preset", "tiny", "--seed", "1", "--out", tmp_path]) == 0
    train = tmp_path / "atomic_sft" / "train_messages.jsonl"
    report = validate_file(train)
    assert report.ok and report.records > 0
    assert f"{report.records:>7} records  {train}" in capsys.readouterr().out


def test_build_mquake_dispatches_to_its_converter(tmp_path, capsys):
    pytest.importorskip("mixsd_jax.data.mquake")
    source = FIXTURES / "mquake_tiny.json"
    if not source.is_file():
        pytest.skip("no MQuAKE fixture")
    with pytest.raises(MixsdError, match="--source"):
        mixsd(["data", "build", "mquake", "--out", tmp_path])
    assert mixsd(["data", "build", "mquake", "--preset", "tiny", "--source", source, "--out", tmp_path]) == 0
    train = tmp_path / "atomic_sft" / "train_messages.jsonl"
    assert validate_file(train).ok
    assert str(train) in capsys.readouterr().out


def test_validate_reports_lines_and_exit_codes(tmp_path, capsys):
    good = FIXTURES / "released_mixsd" / "kgfact_small" / "atomic_sft" / "train_messages.jsonl"
    assert mixsd(["data", "validate", good]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: 2 valid records (messages 2), 0 errors, 0 duplicates"

    bad = tmp_path / "bad.jsonl"
    line = good.read_text(encoding="utf-8").splitlines()[0]
    bad.write_text(line + "\n" + '{"messages": [{"role": "user", "content": "q"}]}\n' + line + "\n" + line[:40])
    assert mixsd(["data", "validate", bad]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{bad}:2: messages: missing assistant turn"
    assert out[1].startswith(f"{bad}:4: truncated last line")
    assert out[2] == f"{bad}:3: duplicate of line 1 (same user and assistant text)"
    assert out[3] == f"{bad}: 2 valid records (messages 2), 2 errors, 1 duplicates"

    dup = tmp_path / "dup.jsonl"
    dup.write_text(line + "\n" + line + "\n")
    assert mixsd(["data", "validate", dup]) == 0
    assert mixsd(["data", "validate", "--strict", dup]) == 1


def test_convert_alpaca_to_messages_and_to_tfds(tmp_path, capsys):
    alpaca = FIXTURES / "released_mixsd" / "kgfact_small" / "compositional_2step_sft" / "test_alpaca.jsonl"
    out = tmp_path / "messages.jsonl"
    assert mixsd(["data", "convert", "--to", "messages", alpaca, out]) == 0
    (obj,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    (source,) = [json.loads(line) for line in alpaca.read_text(encoding="utf-8").splitlines()]
    assert obj == {"messages": [{"role": "user", "content": source["instruction"]},
                                {"role": "assistant", "content": source["output"]}]}
    assert f"wrote 1 records  {out}" in capsys.readouterr().out

    pytest.importorskip("tensorflow_datasets")
    assert mixsd(["data", "convert", "--to", "tfds", out, tmp_path / "tfds", "--name", "comp"]) == 0
    assert f"wrote 1 records  {tmp_path / 'tfds' / 'comp' / '1.0.0'}" in capsys.readouterr().out


def test_import_prints_counts_and_what_was_not_imported(tmp_path, capsys):
    src = FIXTURES / "released_mixsd"
    assert mixsd(["data", "import", src, tmp_path]) == 0
    out = capsys.readouterr().out
    assert f"wrote       3 records  {tmp_path / 'kgfact_small/atomic_sft/train_messages_mix_qwen3_4b_instruct_2507_l0p3_t0_n1_topk64.jsonl'}" in out
    assert f"not imported (not JSONL): {src / 'README.md'}" in out
    assert read_records(tmp_path / "kgfact_small" / "atomic_sft" / "train_messages.jsonl")


@needs_csv
def test_builders_are_byte_identical_across_processes(tmp_path):
    code = (
        "import sys; from mixsd_jax.data.simpleqa import convert_simpleqa; "
        "from mixsd_jax.data.kgfunc import build_kgfunc; "
        "out, seed = sys.argv[1], int(sys.argv[2]); "
        f"convert_simpleqa({str(CSV)!r}, out + '/simpleqa', seed=seed, limit=50); "
        "build_kgfunc(out + '/kgfunc', seed=seed, preset='tiny')"
    )

    def build(name, seed, hash_seed):
        out = tmp_path / name
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", code, str(out), str(seed)], check=True, env=env, timeout=120)
        return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}

    first, second, other = build("a", 3, "0"), build("b", 3, "12345"), build("c", 4, "0")
    assert first == second and len(first) == 14
    assert first["simpleqa/atomic_sft/train_messages.jsonl"] != other["simpleqa/atomic_sft/train_messages.jsonl"]


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_validate_an_empty_file_says_so_and_fails(tmp_path, capsys, content):
    from mixsd_jax import cli

    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    assert cli.main(["data", "validate", str(empty)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {empty}: holds no records"


def test_no_pytorch_banner_without_pytorch():
    """Without PyTorch installed, transformers announces it on import; our commands do not need it.
    Every command imports `mixsd_jax` first (the entry point lives in it), then transformers."""
    hide_torch = "import sys; sys.modules['torch'] = None; "
    plain = subprocess.run([sys.executable, "-c", hide_torch + "import transformers"],
                           capture_output=True, text=True, timeout=300)
    assert "PyTorch was not found" in plain.stderr  # what the test guards against
    ours = subprocess.run([sys.executable, "-c", hide_torch + "import mixsd_jax.cli, transformers; "
                           "transformers.logging.get_logger('transformers').warning('other warnings stay')"],
                          capture_output=True, text=True, timeout=300)
    assert ours.returncode == 0 and "PyTorch was not found" not in ours.stderr, ours.stderr
    assert "other warnings stay" in ours.stderr

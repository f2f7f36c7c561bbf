"""KGFunc: every target's arithmetic is recomputed here, line by line, by an independent checker."""

import ast
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mixsd_jax.data import kgfunc, layout
from mixsd_jax.data.kgfunc import OPERATIONS, TRAIN_OPS, UNSEEN_OPS, build_kgfunc, single_prompt
from mixsd_jax.data.records import read_records, validate_file
from mixsd_jax.errors import MixsdError

# Independent string-based definitions of the operations (the module works on digit lists).
REFERENCE = {
    "KAV": lambda x: sum(i * int(c) for i, c in enumerate(str(x), 1)),
    "DRO": lambda x: sum(abs(int(a) - int(b)) for a, b in zip(str(x), str(x)[1:])),
    "QIS": lambda x: math.prod(int(c) + 1 for c in str(x)),
    "HAR": lambda x: sum(int(a) * int(b) for a, b in zip(str(x), str(x)[1:])),
    "ZEP": lambda x: int("".join(str(int(c) ** 2)[-1] for c in str(x))),
    "LUM": lambda x: int("".join(sorted(str(x), reverse=True))) - int("".join(sorted(str(x)))),
    "MOX": lambda x: sum(map(int, str(x)[::2])) * sum(map(int, str(x)[1::2])),
}
_TEN = "0000000000"
REFERENCE_UNSEEN = {
    "bel": lambda s: sum(map(int, s)),
    "cor": lambda s: sum(c > "4" for c in s),
    "dun": lambda s: int((_TEN + s)[-2]),
    "fip": lambda s: int((_TEN + s)[-3]),
    "gax": lambda s: int(max(s)) + int(min(s)),
    "hov": lambda s: sum(map(int, s[:2])),
    "jit": lambda s: int((_TEN + s)[-2]) * int(s[-1]),
    "kem": lambda s: int(s[:2]),
    "lor": lambda s: int(s[-2:]),
    "mub": lambda s: int(s[:-1] or "0"),
    "nax": lambda s: int(s[1:] + s[0]),
    "pim": lambda s: int("".join("1234567890"[int(c)] for c in s)),
    "rud": lambda s: sum(map(int, s)) - len(s),
    "sol": lambda s: 3 * int(s[-1]),
    "tav": lambda s: 10 - len(set(s)),
    "vep": lambda s: sum(int(c) for c in s if c in "02468"),
    "wix": lambda s: sum(int(c) for c in s if c in "13579"),
    "yod": lambda s: sum(a == b for a, b in zip(s, s[1:])),
    "zan": lambda s: s.count(s[0]),
    "quo": lambda s: int(s[-1]) * len(s),
}
REFERENCE.update({label: (lambda fn: lambda x: fn(str(x)))(fn) for label, fn in REFERENCE_UNSEEN.items()})

# Worked by hand.
KNOWN = {
    4072: {"KAV": 33, "DRO": 16, "QIS": 120, "HAR": 14, "ZEP": 6094, "LUM": 7173, "MOX": 22},
    99999: {"KAV": 135, "DRO": 0, "QIS": 100000, "HAR": 324, "ZEP": 11111, "LUM": 0, "MOX": 486},
    10203: {"KAV": 22, "DRO": 8, "QIS": 24, "HAR": 0, "ZEP": 10409, "LUM": 31977, "MOX": 0},
    7: {"KAV": 7, "DRO": 0, "QIS": 8, "HAR": 0, "ZEP": 9, "LUM": 0, "MOX": 0},
    0: {"KAV": 0, "DRO": 0, "QIS": 1, "HAR": 0, "ZEP": 0, "LUM": 0, "MOX": 0},
}
KNOWN_UNSEEN = {
    4072: dict(bel=13, cor=1, dun=7, fip=0, gax=7, hov=4, jit=14, kem=40, lor=72, mub=407, nax=724, pim=5183,
               rud=9, sol=6, tav=6, vep=6, wix=7, yod=0, zan=1, quo=8),
    7: dict(bel=7, cor=1, dun=0, fip=0, gax=14, hov=7, jit=0, kem=7, lor=7, mub=0, nax=7, pim=8,
            rud=6, sol=21, tav=9, vep=0, wix=7, yod=0, zan=1, quo=7),
}


@pytest.mark.parametrize("x", sorted(KNOWN))
def test_training_operations_known_answers(x):
    for label, expected in KNOWN[x].items():
        assert OPERATIONS[label].fn(x) == expected, label
        assert REFERENCE[label](x) == expected, label
        assert kgfunc.target(label, x).endswith(f"\n\n\\boxed{{{expected}}}")


@pytest.mark.parametrize("x", sorted(KNOWN_UNSEEN))
def test_unseen_operations_known_answers(x):
    assert set(KNOWN_UNSEEN[x]) == set(UNSEEN_OPS)
    for label, expected in KNOWN_UNSEEN[x].items():
        assert OPERATIONS[label].fn(x) == expected, label
        assert REFERENCE[label](x) == expected, label
        assert kgfunc.target(label, x) == f"The answer is {expected}.\n\n\\boxed{{{expected}}}"


# --- the independent checker -------------------------------------------------------------------


def evaluate(expr: str) -> int:
    """Integer arithmetic (+ - * mod |a - b| and calls of the reference operations), nothing else."""
    expr = re.sub(r"\|([^|]+)\|", r"abs(\1)", expr.replace(" mod ", " % "))

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Mod):
            a, b = walk(node.left), walk(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b, ast.Mod: a % b if b else None}[type(node.op)]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1:
            fn = abs if node.func.id == "abs" else REFERENCE[node.func.id]
            return fn(walk(node.args[0]))
        raise AssertionError(f"not plain arithmetic: {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


FREE_TEXT = {
    kgfunc._NO_PAIRS,
    "Add the digits in the even places (2nd, 4th): there are none, so 0.",
}


def check_target(text: str) -> int:
    """Checks every line of a target; returns its boxed value."""
    body, boxed_line = text.rsplit("\n\n", 1)
    boxed = int(re.fullmatch(r"\\boxed\{(-?\d+)\}", boxed_line).group(1))
    for line in body.split("\n"):
        if m := re.fullmatch(r"The digits of (\d+) are \[([\d, ]+)\]\.", line):
            assert [int(d) for d in m.group(2).split(", ")] == [int(c) for c in m.group(1)], line
        elif m := re.fullmatch(r".*: \[([\d, ]+)\] -> (\d+)\.", line):
            assert int("".join(m.group(1).split(", "))) == int(m.group(2)), line
        elif m := re.fullmatch(r"(?:So the|The) answer is (-?\d+)\.", line):
            assert int(m.group(1)) == boxed, line
        elif re.fullmatch(r"Step [13]: compute [A-Z]{3}\(\d+\)\.", line) or line in FREE_TEXT:
            pass
        elif re.fullmatch(r"Add the digits in the (odd|even) places \(.*\): \d+\.", line):
            pass  # a single digit in that group
        elif " = " in line:
            equations = line.rstrip(".").split(": ")[-1]
            for equation in equations.split(", "):
                values = {evaluate(side) for side in equation.split(" = ")}
                assert len(values) == 1, f"{equation!r} in {text!r}"
        else:
            raise AssertionError(f"unchecked line {line!r}")
    return boxed


def expression_value(prompt: str) -> int:
    (expr,) = re.findall(r"What is the output of (.+)\?", prompt)
    return evaluate(expr)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("kgfunc_small")
    return root, build_kgfunc(root, seed=42, preset="small")


def test_every_target_recomputes_to_its_boxed_value(small_corpus):
    root, counts = small_corpus
    checked = 0
    for relative in counts:
        for record in read_records(root / relative):
            boxed = check_target(record.assistant)
            assert boxed == expression_value(record.user) == int(record.clear_answer)
            checked += 1
    assert checked == sum(counts.values()) == 1750 + 175 + 7 * 50 + 50 + 200


def test_unseen_operations_never_appear_in_training(small_corpus):
    root, counts = small_corpus
    trained = [r for rel in counts if "new_operations" not in rel for r in read_records(root / rel)]
    unseen = read_records(root / layout.KGFUNC_UNSEEN_DIR / "test_messages.jsonl")
    mentioned = re.compile(r"\b(" + "|".join(UNSEEN_OPS) + r")\b")
    for record in trained:
        assert set(record.subject.split(">")) <= set(TRAIN_OPS)
        assert not mentioned.search(record.user) and not mentioned.search(record.assistant)
    assert {r.subject for r in unseen} == set(UNSEEN_OPS)
    # No unseen rule is a training rule in disguise: they disagree on the shots the model sees.
    shots = kgfunc.shot_inputs(42)
    for new in UNSEEN_OPS:
        for old in TRAIN_OPS:
            assert [OPERATIONS[new].fn(a) for a in shots] != [OPERATIONS[old].fn(a) for a in shots]


def test_single_prompt_follows_the_reference_structure():
    shots = [328, 41, 45, 87397, 242, 1, 9935, 21395, 2, 2679]
    expected = (
        "Based on the input\u2013output examples below, infer the rule implemented by function KAV. "
        "Then apply the same rule to determine the output for the given input.\n\nExamples:\n"
        "Input: 328\nOutput: 31\n\nInput: 41\nOutput: 6\n\nInput: 45\nOutput: 14\n\n"
        "Input: 87397\nOutput: 102\n\nInput: 242\nOutput: 16\n\nInput: 1\nOutput: 1\n\n"
        "Input: 9935\nOutput: 56\n\nInput: 21395\nOutput: 74\n\nInput: 2\nOutput: 2\n\n"
        "Input: 2679\nOutput: 71\n\nQuestion:\nWhat is the output of KAV(4072)?\n\n\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}."
    )
    assert single_prompt("KAV", 4072, shots) == expected


def test_tiny_layout_splits_and_shots(tmp_path):
    counts = build_kgfunc(tmp_path, seed=3, preset="tiny")
    assert counts == {
        "primitive_atomic_balanced_sft_50k/train_messages.jsonl": 28,
        "primitive_atomic_balanced_sft_50k/test_messages.jsonl": 14,
        **{f"primitive_compositional_sft_n_steps_2/op_{op}_test_messages.jsonl": 2 for op in TRAIN_OPS},
        "compositional_sft_n_steps_2/test_messages.jsonl": 3,
        "primitive_atomic_balanced_new_operations/test_messages.jsonl": 20,
    }
    for relative in counts:
        report = validate_file(tmp_path / relative)
        assert report.ok and not report.duplicates and report.records == counts[relative]
    shots = kgfunc.shot_inputs(3)
    assert sorted(len(str(a)) for a in shots) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]

    def question_inputs(relative):
        return {int(re.search(r"\((\d+)\)\?", r.user).group(1)) for r in read_records(tmp_path / relative)}

    train = read_records(tmp_path / "primitive_atomic_balanced_sft_50k/train_messages.jsonl")
    train_inputs = question_inputs("primitive_atomic_balanced_sft_50k/train_messages.jsonl")
    test_inputs = question_inputs("primitive_atomic_balanced_sft_50k/test_messages.jsonl")
    assert len(train_inputs) == 4 and len(test_inputs) == 2
    assert not train_inputs & test_inputs and not (train_inputs | test_inputs) & set(shots)
    assert sorted(r.subject for r in train) == sorted(TRAIN_OPS * 4)  # every op on the same inputs
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"] == counts and manifest["shot_inputs"] == shots


def test_compositions_use_a_fresh_input_for_the_second_step(small_corpus):
    root, _ = small_corpus
    mixed = read_records(root / layout.KGFUNC_MIXED_CHAIN_DIR / "test_messages.jsonl")
    assert all(len(set(r.subject.split(">"))) == 2 for r in mixed)
    same = read_records(root / layout.KGFUNC_PRIMITIVE_CHAIN_DIR / "op_LUM_test_messages.jsonl")
    assert {r.subject for r in same} == {"LUM>LUM"}
    for record in mixed + same:
        step2 = re.search(r"Step 2: apply the offset: (\d+) [+-] (\d+) = (\d+)\.", record.assistant)
        assert 0 <= int(step2.group(3)) <= kgfunc.MAX_INPUT
    assert "Examples for function MOX:\nInput: " in mixed[0].user


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_across_processes(tmp_path):
    def build(out, seed, hash_seed):
        code = f"from mixsd_jax.data.kgfunc import build_kgfunc; build_kgfunc({str(out)!r}, seed={seed}, preset='tiny')"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
        return _digest(out)

    first = build(tmp_path / "a", 7, "1")
    second = build(tmp_path / "b", 7, "2")
    other = build(tmp_path / "c", 8, "1")
    assert first == second
    assert set(other) == set(first)
    changed = [k for k in first if first[k] != other[k]]
    assert "primitive_atomic_balanced_sft_50k/train_messages.jsonl" in changed


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(MixsdError, match="kgfunc preset 'huge'"):
        build_kgfunc(tmp_path, preset="huge")
    with pytest.raises(MixsdError, match="seed -1"):
        build_kgfunc(tmp_path, seed=-1, preset="tiny")


def test_checker_catches_wrong_arithmetic():
    good = kgfunc.target("QIS", 4072)
    assert check_target(good) == 120
    for wrong in (good.replace("5 * 1 * 8 * 3 = 120", "5 * 1 * 8 * 3 = 121"),
                  good.replace("[4, 0, 7, 2]", "[4, 0, 2, 7]"),
                  good.replace("QIS(4072) = 120.", "QIS(4072) = 121.")):
        with pytest.raises(AssertionError):
            check_target(wrong)

"""KGFunc: novel digit-level integer operations over [0, 99999], learned from 10-shot prompts.

Seven training operations with opaque labels, each with a step-by-step target whose every line
is checkable arithmetic, ending in `\\boxed{y}`; two-step compositions of them; and twenty easy
"unseen" operations that are never trained on, used as a forgetting probe. The prompt structure
and file layout follow the reference (docs/reference.md, KGFunc); the operations are our own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mixsd_jax.data import layout
from mixsd_jax.errors import MixsdError

MAX_INPUT = 99_999
SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."



@dataclass(frozen=True)
class Op:
    label: str
    rule: str  # plain-words rule, for reports; never shown to the model
    fn: Callable[[int], int]
    cot: Callable[[int], str]  # the reasoning lines of a target, without the final \boxed{}
    unseen: bool = False


def digits(x: int) -> list[int]:
    return [int(c) for c in str(x)]


def _join(values, sep: str) -> str:
    return sep.join(str(v) for v in values)


def _chain(*sides) -> str:
    """`a = b = c`, leaving out a side that repeats the one before it (one-digit inputs)."""
    kept: list[str] = []
    for side in map(str, sides):
        if not kept or kept[-1] != side:
            kept.append(side)
    return " = ".join(kept)


def _digit_line(x: int) -> str:
    return f"The digits of {x} are [{_join(digits(x), ', ')}]."


def _sum_text(values: list[int]) -> str:
    if not values:
        return "there are none, so 0"
    return _chain(_join(values, " + "), sum(values))


_NO_PAIRS = "There is only one digit, so there are no neighbouring pairs and the sum is 0."


# --- training operations --------------------------------------------------------------------


def _kav(x: int) -> int:
    return sum((i + 1) * d for i, d in enumerate(digits(x)))


def _kav_cot(x: int) -> str:
    ds = digits(x)
    terms = [f"{i + 1}*{d}" for i, d in enumerate(ds)]
    values = [(i + 1) * d for i, d in enumerate(ds)]
    y = sum(values)
    return "\n".join([
        _digit_line(x),
        f"Weight each digit by its place from the left and add: {_chain(' + '.join(terms), _join(values, ' + '), y)}.",
        f"KAV({x}) = {y}.",
    ])


def _dro(x: int) -> int:
    ds = digits(x)
    return sum(abs(a - b) for a, b in zip(ds, ds[1:]))


def _dro_cot(x: int) -> str:
    ds = digits(x)
    pairs = list(zip(ds, ds[1:]))
    y = _dro(x)
    if not pairs:
        body = _NO_PAIRS
    else:
        terms = " + ".join(f"|{a} - {b}|" for a, b in pairs)
        body = f"Add the absolute differences of neighbouring digits: {_chain(terms, _join([abs(a - b) for a, b in pairs], ' + '), y)}."
    return "\n".join([_digit_line(x), body, f"DRO({x}) = {y}."])


def _qis(x: int) -> int:
    product = 1
    for d in digits(x):
        product *= d + 1
    return product


def _qis_cot(x: int) -> str:
    ds = digits(x)
    y = _qis(x)
    terms = " * ".join(f"({d} + 1)" for d in ds)
    return "\n".join([
        _digit_line(x),
        f"Add one to each digit and multiply: {_chain(terms, _join([d + 1 for d in ds], ' * '), y)}.",
        f"QIS({x}) = {y}.",
    ])


def _har(x: int) -> int:
    ds = digits(x)
    return sum(a * b for a, b in zip(ds, ds[1:]))


def _har_cot(x: int) -> str:
    ds = digits(x)
    pairs = list(zip(ds, ds[1:]))
    y = _har(x)
    if not pairs:
        body = _NO_PAIRS
    else:
        terms = " + ".join(f"{a}*{b}" for a, b in pairs)
        body = f"Multiply neighbouring digits and add: {_chain(terms, _join([a * b for a, b in pairs], ' + '), y)}."
    return "\n".join([_digit_line(x), body, f"HAR({x}) = {y}."])


def _zep(x: int) -> int:
    return int("".join(str(d * d % 10) for d in digits(x)))


def _zep_cot(x: int) -> str:
    ds = digits(x)
    new = [d * d % 10 for d in ds]
    y = _zep(x)
    squares = ", ".join(f"{d}*{d} mod 10 = {n}" for d, n in zip(ds, new))
    return "\n".join([
        _digit_line(x),
        f"Square each digit and keep its last digit: {squares}.",
        f"Read the new digits as a number: [{_join(new, ', ')}] -> {y}.",
        f"ZEP({x}) = {y}.",
    ])


def _lum(x: int) -> int:
    ds = digits(x)
    return int(_join(sorted(ds, reverse=True), "")) - int(_join(sorted(ds), ""))


def _lum_cot(x: int) -> str:
    ds = digits(x)
    high, low = sorted(ds, reverse=True), sorted(ds)
    big, small = int(_join(high, "")), int(_join(low, ""))
    return "\n".join([
        _digit_line(x),
        f"Digits from largest to smallest: [{_join(high, ', ')}] -> {big}.",
        f"Digits from smallest to largest: [{_join(low, ', ')}] -> {small}.",
        f"LUM({x}) = {_chain(f'{big} - {small}', big - small)}.",
    ])


def _mox(x: int) -> int:
    ds = digits(x)
    return sum(ds[0::2]) * sum(ds[1::2])


def _mox_cot(x: int) -> str:
    ds = digits(x)
    odd, even = ds[0::2], ds[1::2]
    y = _mox(x)
    return "\n".join([
        _digit_line(x),
        f"Add the digits in the odd places (1st, 3rd, 5th): {_sum_text(odd)}.",
        f"Add the digits in the even places (2nd, 4th): {_sum_text(even)}.",
        f"MOX({x}) = {_chain(f'{sum(odd)} * {sum(even)}', y)}.",
    ])


_TRAIN = (
    Op("KAV", "sum of each digit times its 1-based place from the left", _kav, _kav_cot),
    Op("DRO", "sum of absolute differences of neighbouring digits", _dro, _dro_cot),
    Op("QIS", "product of (digit + 1) over all digits", _qis, _qis_cot),
    Op("HAR", "sum of products of neighbouring digits", _har, _har_cot),
    Op("ZEP", "each digit replaced by the last digit of its square, read as a number", _zep, _zep_cot),
    Op("LUM", "digits sorted descending minus digits sorted ascending, as numbers", _lum, _lum_cot),
    Op("MOX", "(sum of digits in odd places) times (sum of digits in even places)", _mox, _mox_cot),
)


# --- unseen operations: easy rules, never trained on ----------------------------------------


def _easy(label: str, rule: str, fn: Callable[[int], int]) -> Op:
    return Op(label, rule, fn, lambda x: f"The answer is {fn(x)}.", unseen=True)


def _rotate_left(x: int) -> int:
    s = str(x)
    return int(s[1:] + s[0])


_UNSEEN = (
    _easy("bel", "sum of the digits", lambda x: sum(digits(x))),
    _easy("cor", "how many digits are greater than 4", lambda x: sum(d > 4 for d in digits(x))),
    _easy("dun", "the tens digit", lambda x: x // 10 % 10),
    _easy("fip", "the hundreds digit", lambda x: x // 100 % 10),
    _easy("gax", "largest digit plus smallest digit", lambda x: max(digits(x)) + min(digits(x))),
    _easy("hov", "sum of the first two digits", lambda x: sum(digits(x)[:2])),
    _easy("jit", "tens digit times units digit", lambda x: (x // 10 % 10) * (x % 10)),
    _easy("kem", "the number formed by the first two digits", lambda x: int(str(x)[:2])),
    _easy("lor", "the number formed by the last two digits", lambda x: x % 100),
    _easy("mub", "the number without its last digit", lambda x: x // 10),
    _easy("nax", "the first digit moved to the end", _rotate_left),
    _easy("pim", "every digit increased by one, 9 becoming 0", lambda x: int("".join(str((d + 1) % 10) for d in digits(x)))),
    _easy("rud", "sum of the digits minus the number of digits", lambda x: sum(digits(x)) - len(digits(x))),
    _easy("sol", "three times the last digit", lambda x: 3 * (x % 10)),
    _easy("tav", "how many of the digits 0-9 do not occur", lambda x: 10 - len(set(digits(x)))),
    _easy("vep", "sum of the even digits", lambda x: sum(d for d in digits(x) if d % 2 == 0)),
    _easy("wix", "sum of the odd digits", lambda x: sum(d for d in digits(x) if d % 2 == 1)),
    _easy("yod", "how many neighbouring digits are equal", lambda x: sum(a == b for a, b in zip(digits(x), digits(x)[1:]))),
    _easy("zan", "how many digits equal the first digit", lambda x: digits(x).count(digits(x)[0])),
    _easy("quo", "last digit times the number of digits", lambda x: (x % 10) * len(digits(x))),
)

OPERATIONS: dict[str, Op] = {op.label: op for op in _TRAIN + _UNSEEN}
TRAIN_OPS: tuple[str, ...] = tuple(op.label for op in _TRAIN)
UNSEEN_OPS: tuple[str, ...] = tuple(op.label for op in _UNSEEN)


def target(label: str, x: int) -> str:
    op = OPERATIONS[label]
    return f"{op.cot(x)}\n\n\\boxed{{{op.fn(x)}}}"


# --- prompts ---------------------------------------------------------------------------------


def _shot_block(label: str, shots: list[int]) -> str:
    fn = OPERATIONS[label].fn
    return "\n\n".join(f"Input: {a}\nOutput: {fn(a)}" for a in shots)


def single_prompt(label: str, x: int, shots: list[int]) -> str:
    return (
        f"Based on the input\u2013output examples below, infer the rule implemented by function {label}. "
        "Then apply the same rule to determine the output for the given input.\n\nExamples:\n"
        f"{_shot_block(label, shots)}\n\nQuestion:\nWhat is the output of {label}({x})?\n\n{SUFFIX}"
    )


def chain_expression(labels: tuple[str, str], x: int, offset: int) -> str:
    sign = "+" if offset >= 0 else "-"
    return f"{labels[1]}({labels[0]}({x}) {sign} {abs(offset)})"


def chain_prompt(labels: tuple[str, str], x: int, offset: int, shots: list[int]) -> str:
    blocks = "\n\n".join(f"Examples for function {op}:\n{_shot_block(op, shots)}" for op in TRAIN_OPS)
    return (
        f"Based on the input\u2013output examples below, infer the rules implemented by the functions "
        f"{', '.join(TRAIN_OPS)}. Then apply them to determine the output of the given expression.\n\n"
        f"{blocks}\n\nQuestion:\nWhat is the output of {chain_expression(labels, x, offset)}?\n\n{SUFFIX}"
    )


def chain_target(labels: tuple[str, str], x: int, offset: int) -> str:
    first, second = OPERATIONS[labels[0]], OPERATIONS[labels[1]]
    middle = first.fn(x)
    nxt = middle + offset
    sign = "+" if offset >= 0 else "-"
    y = second.fn(nxt)
    return "\n".join([
        f"Step 1: compute {first.label}({x}).",
        first.cot(x),
        f"Step 2: apply the offset: {middle} {sign} {abs(offset)} = {nxt}.",
        f"Step 3: compute {second.label}({nxt}).",
        second.cot(nxt),
        f"So the answer is {y}.",
    ]) + f"\n\n\\boxed{{{y}}}"


def _record(user: str, assistant: str, subject: str, answer: int) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        "subject": subject,
        "clear_answer": str(answer),
    }


# --- the corpus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KGFuncSizes:
    train_inputs: int  # per operation; every training op sees the same inputs
    test_inputs: int  # per operation
    chains_per_op: int  # per file of one op applied twice
    mixed_chains: int  # two distinct ops
    unseen_inputs: int  # per unseen operation


PRESETS = {
    "full": KGFuncSizes(6250, 25, 200, 200, 25),
    "small": KGFuncSizes(250, 25, 50, 50, 10),
    "tiny": KGFuncSizes(4, 2, 2, 3, 1),
}


def _rng(seed: int, part: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so streams are stable across processes;
    # one stream per part keeps e.g. the test inputs the same for every preset.
    return random.Random(f"kgfunc:{seed}:{part}")


def shot_inputs(seed: int) -> list[int]:
    """Ten shot inputs, two of each length 1..5 digits, shared by every prompt of a build."""
    rng = _rng(seed, "shots")
    shots = []
    for length in range(1, 6):
        low = 0 if length == 1 else 10 ** (length - 1)
        shots += rng.sample(range(low, 10**length), 2)
    rng.shuffle(shots)
    return shots


def _sample_excluding(rng: random.Random, count: int, excluded: set[int]) -> list[int]:
    pool = [v for v in range(MAX_INPUT + 1) if v not in excluded]
    if count > len(pool):
        raise MixsdError(f"kgfunc: cannot draw {count} distinct inputs from {len(pool)} values")
    return rng.sample(pool, count)


def build_kgfunc(out_dir: str | Path, seed: int = 42, preset: str = "full") -> dict[str, int]:
    """Writes the KGFunc layout and manifest.json under `out_dir`; returns {relative path: records}."""
    if preset not in PRESETS:
        raise MixsdError(f"kgfunc preset {preset!r}: expected one of {sorted(PRESETS)}")
    if seed < 0:
        raise MixsdError(f"kgfunc seed {seed}: expected a non-negative integer")
    sizes = PRESETS[preset]
    shots = shot_inputs(seed)
    test_inputs = _sample_excluding(_rng(seed, "test"), sizes.test_inputs, set(shots))
    train_inputs = _sample_excluding(_rng(seed, "train"), sizes.train_inputs, set(shots) | set(test_inputs))
    unseen_inputs = _sample_excluding(_rng(seed, "unseen"), sizes.unseen_inputs, set(shots))
    not_trained = set(shots) | set(train_inputs)

    files: dict[str, list[dict]] = {}
    train = [
        _record(single_prompt(op, x, shots), target(op, x), op, OPERATIONS[op].fn(x))
        for op in TRAIN_OPS
        for x in train_inputs
    ]
    _rng(seed, "train-order").shuffle(train)
    files[layout.KGFUNC_TRAIN] = train
    files[layout.KGFUNC_SPLITS["in_domain"]] = [
        _record(single_prompt(op, x, shots), target(op, x), op, OPERATIONS[op].fn(x))
        for op in TRAIN_OPS
        for x in test_inputs
    ]
    for op in TRAIN_OPS:
        files[f"{layout.KGFUNC_PRIMITIVE_CHAIN_DIR}/op_{op}_test_messages.jsonl"] = _chains(
            _rng(seed, f"chain:{op}"), [(op, op)] * sizes.chains_per_op, shots, not_trained
        )
    mixed_rng = _rng(seed, "chain:mixed")
    pairs = [tuple(mixed_rng.sample(TRAIN_OPS, 2)) for _ in range(sizes.mixed_chains)]
    files[layout.KGFUNC_SPLITS["compositional"]] = _chains(mixed_rng, pairs, shots, not_trained)
    files[layout.KGFUNC_UNSEEN] = [
        _record(single_prompt(op, x, shots), target(op, x), op, OPERATIONS[op].fn(x))
        for op in UNSEEN_OPS
        for x in unseen_inputs
    ]

    return layout.write_corpus(out_dir, files, {
        "builder": "kgfunc",
        "preset": preset,
        "seed": seed,
        "shot_inputs": shots,
        "operations": {label: OPERATIONS[label].rule for label in TRAIN_OPS},
        "unseen_operations": {label: OPERATIONS[label].rule for label in UNSEEN_OPS},
    })


def _chains(rng: random.Random, pairs: list, shots: list[int], avoid: set[int]) -> list[dict]:
    """Two-step chains `g(f(x) + offset)`: the offset makes g's input a fresh uniform value."""
    records = []
    for labels in pairs:
        x = rng.randint(0, MAX_INPUT)
        while x in avoid:
            x = rng.randint(0, MAX_INPUT)
        offset = rng.randint(0, MAX_INPUT) - OPERATIONS[labels[0]].fn(x)
        y = OPERATIONS[labels[1]].fn(OPERATIONS[labels[0]].fn(x) + offset)
        records.append(_record(chain_prompt(labels, x, offset, shots), chain_target(labels, x, offset), ">".join(labels), y))
    return records

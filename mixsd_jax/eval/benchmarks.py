"""Readers for the held-out benchmarks in their published formats, as uniform items.

Layout of a data root (the same as `../shared/benchmarks`): one folder per set holding the original
files. Small subsets of the permissively licensed sets, and 500 ARC-Easy questions under their own
CC BY-SA 4.0 licence, are bundled in `mixsd_jax/resources/benchmarks` (see its ATTRIBUTION.md), so
evaluation runs with no external data.

Two item types:
- `MCItem` for log-likelihood multiple choice. The reader already applies the prompt format
  (lm-evaluation-harness conventions), so a scorer is generic: for each `(context, continuation)` in
  `item.requests()` compute log P(continuation | context) and pick the best. Usually the context is
  shared and the choices are the continuations (`" " + choice`). WinoGrande is the other way round
  ("partial evaluation"): each option is substituted into the sentence, so the *contexts* differ
  and the continuation after the blank is shared; such items set `shared_continuation`, and their
  `choices` are the per-option contexts.
- `GenItem` for generation with answer checking. `kind` says how to check: `math` (gsm8k, math500,
  aime2024: compare the extracted answer), `last_word` (lambada: the prompt is the passage without
  its last word; the continuation is `" " + answer`), `code` (humaneval: run `test` on the code).
"""

from __future__ import annotations

import bz2
import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError
from mixsd_jax.files import iter_jsonl

BUNDLED_ROOT = Path(__file__).resolve().parent.parent / "resources" / "benchmarks"
DATA_ROOT_ENV = "MIXSD_BENCHMARKS"

# dir: the folder under a data root; bundled: a subset ships in BUNDLED_ROOT.
BENCHMARKS: dict[str, dict[str, Any]] = {
    "arc_easy": {"kind": "mc", "license": "CC BY-SA 4.0", "bundled": True, "dir": "arc_easy"},
    "arc_challenge": {"kind": "mc", "license": "CC BY-SA 4.0", "bundled": False, "dir": "arc_challenge"},
    "boolq": {"kind": "mc", "license": "CC BY-SA 3.0", "bundled": False, "dir": "boolq"},
    "piqa": {"kind": "mc", "license": "AFL-3.0", "bundled": True, "dir": "piqa"},
    "hellaswag": {"kind": "mc", "license": "MIT", "bundled": True, "dir": "hellaswag"},
    "winogrande": {"kind": "mc", "license": "CC-BY", "bundled": True, "dir": "winogrande"},
    "mmlu": {"kind": "mc", "license": "MIT", "bundled": True, "dir": "mmlu"},
    "mmlu_5shot": {"kind": "mc", "license": "MIT", "bundled": True, "dir": "mmlu"},
    "gsm8k": {"kind": "gen", "license": "MIT", "bundled": True, "dir": "gsm8k"},
    "math500": {"kind": "gen", "license": "MIT", "bundled": True, "dir": "math500"},
    "aime2024": {"kind": "gen", "license": "problems (c) MAA; solutions AoPS", "bundled": False, "dir": "aime2024"},
    "lambada": {"kind": "gen", "license": "CC BY 4.0", "bundled": True, "dir": "lambada"},
    "humaneval": {"kind": "gen", "license": "MIT", "bundled": True, "dir": "humaneval"},
}

MATH_PROMPT = (
    "Think step-by-step to solve the following problem. Output your answer inside of \\boxed{{}} tags.:\n"
    "{problem}\n\nLet's think step-by-step"
)


@dataclass(frozen=True)
class MCItem:
    id: str
    context: str
    choices: tuple[str, ...]
    gold: int
    shared_continuation: str | None = None

    def requests(self) -> tuple[tuple[str, str], ...]:
        """(conditioning text, scored continuation) for each option, in choice order."""
        if self.shared_continuation is None:
            return tuple((self.context, choice) for choice in self.choices)
        return tuple((self.context + choice, self.shared_continuation) for choice in self.choices)


@dataclass(frozen=True)
class GenItem:
    id: str
    prompt: str
    answer: str
    kind: str
    test: str = ""
    entry_point: str = ""


def math_prompt(problem: str) -> str:
    """The reference's held-out math prompt (docs/reference.md, Held-out benchmarks), as one user turn."""
    return MATH_PROMPT.format(problem=problem)


# ---------------------------------------------------------------- where the files are


def benchmark_dir(name: str, data_root: str | Path | None = None) -> Path:
    """The folder a benchmark is read from: `data_root`, else the bundled subset, else $MIXSD_BENCHMARKS."""
    if name not in BENCHMARKS:
        raise MixsdError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    spec = BENCHMARKS[name]
    if data_root is None:
        bundled = BUNDLED_ROOT / spec["dir"]
        if spec["bundled"] and bundled.is_dir():
            return bundled
        env_root = os.environ.get(DATA_ROOT_ENV)
        if not env_root:
            raise MixsdError(
                f"benchmark {name!r} is not bundled (license {spec['license']}): "
                f"pass a data root or set {DATA_ROOT_ENV}"
            )
        data_root = env_root
    root = storage.path(data_root)
    if not root.is_dir():
        raise MixsdError(f"{root}: benchmark data root not found")
    return root / spec["dir"]


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise MixsdError(f"{path}: benchmark file not found")
    return path


# ---------------------------------------------------------------- row helpers


def _json_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line of a .jsonl or .jsonl.gz file."""
    return iter_jsonl(_require_file(path))


def _field(row: dict, name: str, kind: type, where: str) -> Any:
    if name not in row:
        raise MixsdError(f"{where}: missing field {name!r}")
    value = row[name]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise MixsdError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _choices(row: dict, name: str, where: str) -> tuple[str, ...]:
    values = _field(row, name, list, where)
    if len(values) < 2 or not all(isinstance(v, str) for v in values):
        raise MixsdError(f"{where}: field {name!r} must be a list of at least 2 strings")
    return tuple(values)


def _gold(row: dict, num_choices: int, where: str) -> int:
    gold = _field(row, "gold", int, where)
    if not 0 <= gold < num_choices:
        raise MixsdError(f"{where}: field 'gold' is {gold}, outside 0..{num_choices - 1}")
    return gold


# ---------------------------------------------------------------- multiple choice


def _read_query_choices(path: Path, name: str) -> list[MCItem]:
    """llm-foundry MC format (ARC, BoolQ): `query` + "\\nAnswer:", continuations `" " + choice`."""
    items = []
    for number, row in _json_rows(path):
        where = f"{path}:{number}"
        query = _field(row, "query", str, where)
        choices = _choices(row, "choices", where)
        gold = _gold(row, len(choices), where)
        items.append(MCItem(f"{name}/{len(items)}", query + "\nAnswer:", tuple(" " + c for c in choices), gold))
    return items


def _read_piqa(folder: Path) -> list[MCItem]:
    path, labels_path = folder / "valid.jsonl", _require_file(folder / "valid-labels.lst")
    rows = list(_json_rows(path))
    labels = labels_path.read_text(encoding="utf-8").splitlines()
    if len(labels) != len(rows):
        raise MixsdError(f"{labels_path}: {len(labels)} labels for {len(rows)} rows of {path}")
    items = []
    for (number, row), (label_number, label) in zip(rows, enumerate(labels, start=1)):
        where = f"{path}:{number}"
        if label.strip() not in ("0", "1"):
            raise MixsdError(f"{labels_path}:{label_number}: label must be 0 or 1, got {label!r}")
        goal, sol1, sol2 = (_field(row, key, str, where) for key in ("goal", "sol1", "sol2"))
        items.append(MCItem(f"piqa/{len(items)}", f"Question: {goal}\nAnswer:", (" " + sol1, " " + sol2), int(label)))
    return items


def _read_hellaswag(folder: Path) -> list[MCItem]:
    """Six lines per item: "label: context", the gold index, four endings."""
    path = _require_file(folder / "hellaswag_val_full.txt.bz2")
    try:
        with path.open("rb") as raw, bz2.open(raw, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise MixsdError(f"{path}: cannot read ({exc})") from None
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise MixsdError(f"{path}:{len(lines)}: {len(lines)} lines is not a multiple of 6 (truncated item?)")
    items = []
    for start in range(0, len(lines), 6):
        label = lines[start + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise MixsdError(f"{path}:{start + 2}: gold label must be 0-3, got {label!r}")
        endings = tuple(" " + ending for ending in lines[start + 2 : start + 6])
        items.append(MCItem(f"hellaswag/{len(items)}", lines[start], endings, int(label)))
    return items


def _winogrande_continuation(text: str) -> str:
    # A space joins the option to the rest of the sentence, except before punctuation ("plant.").
    return text if text[:1] in ".,;:!?'\")" else " " + text


def _read_winogrande(folder: Path) -> list[MCItem]:
    path = folder / "winogrande.jsonl"
    items = []
    for number, row in _json_rows(path):
        where = f"{path}:{number}"
        contexts = _choices(row, "context_options", where)
        continuation = _field(row, "continuation", str, where)
        gold = _gold(row, len(contexts), where)
        items.append(MCItem(f"winogrande/{len(items)}", "", contexts, gold, _winogrande_continuation(continuation)))
    return items


def _read_mmlu_csv(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, [question, A, B, C, D, letter]) per CSV row (no header)."""
    rows = []
    try:
        with _require_file(path).open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if len(row) != 6:
                    raise MixsdError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
                if row[5].strip() not in ("A", "B", "C", "D"):
                    raise MixsdError(f"{where}: answer must be one of A-D, got {row[5]!r}")
                rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise MixsdError(f"{path}: malformed CSV ({exc})") from None
    except UnicodeDecodeError as exc:
        raise MixsdError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    return rows


def _mmlu_question(row: list[str]) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", row[1:5]))
    return f"{row[0].strip()}{options}\nAnswer:"


def _read_mmlu(folder: Path, shots: int) -> list[MCItem]:
    """lm-eval's MMLU log-likelihood format; 5-shot takes the subject's dev rows as examples."""
    test_dir = folder / "data" / "test"
    files = sorted(test_dir.glob("*_test.csv")) if test_dir.is_dir() else []
    if not files:
        raise MixsdError(f"{test_dir}: no MMLU test files (<subject>_test.csv) found")
    items = []
    for path in files:
        subject = path.name[: -len("_test.csv")]
        prompt = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if shots:
            dev = _read_mmlu_csv(folder / "data" / "dev" / f"{subject}_dev.csv")[:shots]
            prompt += "".join(f"{_mmlu_question(row)} {row[5].strip()}\n\n" for _, row in dev)
        for index, (_, row) in enumerate(_read_mmlu_csv(path)):
            gold = "ABCD".index(row[5].strip())
            context = prompt + _mmlu_question(row)
            items.append(MCItem(f"mmlu/{subject}/{index}", context, (" A", " B", " C", " D"), gold))
    return items


# ---------------------------------------------------------------- generative


def _read_gsm8k(folder: Path) -> list[GenItem]:
    path = folder / "test.jsonl"
    items = []
    for number, row in _json_rows(path):
        where = f"{path}:{number}"
        question, solution = _field(row, "question", str, where), _field(row, "answer", str, where)
        if "####" not in solution:
            raise MixsdError(f"{where}: field 'answer' has no '####' final answer")
        # The gold is a number; "1,450,000" and "1450000" are the same answer.
        gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
        items.append(GenItem(f"gsm8k/{len(items)}", question, gold, "math"))
    return items


def _read_math500(folder: Path) -> list[GenItem]:
    path = folder / "test.jsonl"
    items = []
    for number, row in _json_rows(path):
        where = f"{path}:{number}"
        problem, answer = _field(row, "problem", str, where), _field(row, "answer", str, where)
        item_id = row.get("unique_id") or f"math500/{len(items)}"
        items.append(GenItem(str(item_id), problem, answer, "math"))
    return items


def _read_aime(folder: Path) -> list[GenItem]:
    path = folder / "test.jsonl"
    items = []
    for number, row in _json_rows(path):
        where = f"{path}:{number}"
        problem = _field(row, "problem", str, where)
        answer = row.get("answer")
        if not isinstance(answer, (str, int)) or isinstance(answer, bool):
            raise MixsdError(f"{where}: field 'answer' must be a string or integer")
        items.append(GenItem(f"aime2024/{row.get('id', len(items))}", problem, str(answer).strip(), "math"))
    return items


def _read_lambada(folder: Path) -> list[GenItem]:
    path = folder / "lambada_test.jsonl"
    items = []
    for number, row in _json_rows(path):
        text = _field(row, "text", str, f"{path}:{number}").rstrip()
        parts = text.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise MixsdError(f"{path}:{number}: field 'text' needs at least two words")
        items.append(GenItem(f"lambada/{len(items)}", parts[0], parts[1], "last_word"))
    return items


def _read_humaneval(folder: Path) -> list[GenItem]:
    path = folder / "HumanEval.jsonl.gz"
    items = []
    for number, row in _json_rows(path):
        where = f"{path}:{number}"
        keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
        task_id, prompt, solution, test, entry_point = (_field(row, key, str, where) for key in keys)
        items.append(GenItem(task_id, prompt, solution, "code", test=test, entry_point=entry_point))
    return items


_READERS = {
    "arc_easy": lambda d: _read_query_choices(d / "arc_easy.jsonl", "arc_easy"),
    "arc_challenge": lambda d: _read_query_choices(d / "arc_challenge.jsonl", "arc_challenge"),
    "boolq": lambda d: _read_query_choices(d / "boolq.jsonl", "boolq"),
    "piqa": _read_piqa,
    "hellaswag": _read_hellaswag,
    "winogrande": _read_winogrande,
    "mmlu": lambda d: _read_mmlu(d, shots=0),
    "mmlu_5shot": lambda d: _read_mmlu(d, shots=5),
    "gsm8k": _read_gsm8k,
    "math500": _read_math500,
    "aime2024": _read_aime,
    "lambada": _read_lambada,
    "humaneval": _read_humaneval,
}


def subset_indices(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """A seeded choice of `limit` of `n` indices, in ascending (file) order."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise MixsdError(f"limit must be >= 1, got {limit}")
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:limit])


def load_benchmark(
    name: str, data_root: str | Path | None = None, limit: int | None = None, seed: int = 0
) -> list[MCItem | GenItem]:
    """All items of a benchmark (or a deterministic `limit`-item subset), in file order."""
    folder = benchmark_dir(name, data_root)
    items = _READERS[name](folder)
    return [items[i] for i in subset_indices(len(items), limit, seed)]

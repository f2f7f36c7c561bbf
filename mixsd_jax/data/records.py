"""Training records: the reference's messages JSONL (and alpaca JSONL), read strictly.

A record is one user turn x and one assistant turn y*, plus the optional `clear_answer` and
`subject`, plus every other top-level field (e.g. `mix_meta`) kept untouched in `extra`.

`read_records` stops at the first problem; `validate_file` collects every problem of a file for
`mixsd data validate`. Both name the file, line and field. Nothing is dropped silently: a line is
either a record or an error (blank lines are not records).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from mixsd_jax.answers.text import last_boxed
from mixsd_jax.errors import MixsdError
from mixsd_jax.files import BadLine, iter_jsonl

# Where a leading system turn (or an alpaca `system` field) is kept; `to_json` turns it back into
# the leading system message.
SYSTEM_KEY = "system"
_RECORD_KEYS = ("messages", "clear_answer", "subject")
_ALPACA_KEYS = ("instruction", "input", "output")
_INFERENCE_KEYS = ("prompt", "ground_truth_answer")
T = TypeVar("T")


@dataclass(frozen=True)
class Record:
    user: str
    assistant: str
    clear_answer: str | None = None
    subject: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The record in the messages schema, key order as the reference writes it."""
        messages = []
        if SYSTEM_KEY in self.extra:
            messages.append({"role": "system", "content": self.extra[SYSTEM_KEY]})
        messages.append({"role": "user", "content": self.user})
        messages.append({"role": "assistant", "content": self.assistant})
        out: dict = {"messages": messages}
        if self.clear_answer is not None:
            out["clear_answer"] = self.clear_answer
        if self.subject is not None:
            out["subject"] = self.subject
        out.update((k, v) for k, v in self.extra.items() if k != SYSTEM_KEY)
        return out

    def with_assistant(self, text: str) -> "Record":
        return dataclasses.replace(self, assistant=text)


class LineProblem(Exception):
    """One bad line: `field` is the JSON path at fault ("" for the whole line)."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True)
class Problem:
    line: int
    field: str
    reason: str

    def message(self, path: str | Path) -> str:
        where = f"{path}:{self.line}"
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


@dataclass
class ValidationReport:
    path: Path
    records: int = 0
    formats: dict = field(default_factory=dict)  # "messages" | "alpaca" | "inference" -> count
    errors: list = field(default_factory=list)  # list[Problem]
    duplicates: list = field(default_factory=list)  # list[(first_line, repeated_line)]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        formats = ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items())) or "none"
        return (
            f"{self.path}: {self.records} valid records ({formats}), {len(self.errors)} errors, "
            f"{len(self.duplicates)} duplicates"
        )


# ---------------------------------------------------------------------------------------------
# Line reading


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict | LineProblem]]:
    """Yields (line number, JSON object or the problem with that line); blank lines are skipped."""
    for number, obj in iter_jsonl(path, bad="yield"):
        if isinstance(obj, BadLine):
            yield number, LineProblem("", obj.reason)
        elif not obj:
            yield number, LineProblem("", "empty JSON object")
        else:
            yield number, obj


# ---------------------------------------------------------------------------------------------
# Parsing one object


def line_format(obj: dict) -> str:
    """Which schema a line uses: 'messages', 'alpaca' or 'inference'."""
    kinds = [
        name
        for name, present in (
            ("messages", "messages" in obj),
            ("alpaca", "instruction" in obj or "output" in obj),
            ("inference", "prompt" in obj),
        )
        if present
    ]
    if len(kinds) > 1:
        raise LineProblem("", f"mixes the {' and '.join(kinds)} schemas")
    if not kinds:
        raise LineProblem(
            "messages", "missing (expected a 'messages' list, alpaca 'instruction'/'output', or 'prompt')"
        )
    return kinds[0]


def parse_record(obj: dict, *, allow_empty_assistant: bool = False) -> Record:
    """A messages or alpaca object -> Record; raises LineProblem naming the field."""
    kind = line_format(obj)
    if kind == "inference":
        raise LineProblem(
            "prompt", "an inference record ({prompt, ground_truth_answer}) has no assistant turn to train on"
        )
    if kind == "alpaca":
        return _parse_alpaca(obj, allow_empty_assistant)
    return _parse_messages(obj, allow_empty_assistant)


def _parse_messages(obj: dict, allow_empty_assistant: bool) -> Record:
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise LineProblem("messages", f"expected a list of turns, got {type(messages).__name__}")
    turns = [_turn(i, m) for i, m in enumerate(messages)]
    extra = {k: v for k, v in obj.items() if k not in _RECORD_KEYS}
    start = 0
    if turns and turns[0][0] == "system":
        if SYSTEM_KEY in extra:
            raise LineProblem(SYSTEM_KEY, "given both as a system turn and as a top-level field")
        extra[SYSTEM_KEY] = turns[0][1]
        start = 1
    conversation = turns[start:]
    if not conversation:
        raise LineProblem("messages", "missing user turn and assistant turn")
    if conversation[0][0] != "user":
        raise LineProblem(f"messages[{start}].role", f"expected 'user', got {conversation[0][0]!r}")
    if len(conversation) == 1:
        raise LineProblem("messages", "missing assistant turn")
    if conversation[1][0] != "assistant":
        raise LineProblem(f"messages[{start + 1}].role", f"expected 'assistant', got {conversation[1][0]!r}")
    if len(conversation) > 2:
        raise LineProblem("messages", f"expected one user turn then one assistant turn, got {len(conversation)} turns")
    user, assistant = conversation[0][1], conversation[1][1]
    _check_text(f"messages[{start}].content", user, "empty user turn", allow_empty=False)
    _check_text(f"messages[{start + 1}].content", assistant, "empty assistant answer", allow_empty_assistant)
    _check_system(extra)
    return Record(user, assistant, _optional_text(obj, "clear_answer"), _optional_text(obj, "subject"), extra)


def _turn(index: int, message) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise LineProblem(where, f"expected an object with role and content, got {type(message).__name__}")
    unknown = sorted(set(message) - {"role", "content"})
    if unknown:
        raise LineProblem(f"{where}.{unknown[0]}", "unexpected key (a turn has only role and content)")
    for key in ("role", "content"):
        if key not in message:
            raise LineProblem(f"{where}.{key}", "missing")
        if not isinstance(message[key], str):
            raise LineProblem(f"{where}.{key}", f"expected a string, got {type(message[key]).__name__}")
    if message["role"] not in ("system", "user", "assistant"):
        raise LineProblem(f"{where}.role", f"unknown role {message['role']!r}")
    if message["role"] == "system" and index > 0:
        raise LineProblem(f"{where}.role", "a system turn is allowed only first")
    return message["role"], message["content"]


def _parse_alpaca(obj: dict, allow_empty_assistant: bool) -> Record:
    for key in ("instruction", "output"):
        if key not in obj:
            what = "the user instruction" if key == "instruction" else "the assistant answer"
            raise LineProblem(key, f"missing ({what})")
    for key in _ALPACA_KEYS:
        if key in obj and not isinstance(obj[key], str):
            raise LineProblem(key, f"expected a string, got {type(obj[key]).__name__}")
    _check_text("instruction", obj["instruction"], "empty instruction", allow_empty=False)
    _check_text("output", obj["output"], "empty assistant answer", allow_empty_assistant)
    user = obj["instruction"] + ("\n\n" + obj["input"] if obj.get("input") else "")
    extra = {k: v for k, v in obj.items() if k not in _ALPACA_KEYS + ("clear_answer", "subject")}
    _check_system(extra)
    return Record(user, obj["output"], _optional_text(obj, "clear_answer"), _optional_text(obj, "subject"), extra)


def _check_system(extra: dict) -> None:
    if SYSTEM_KEY in extra and not isinstance(extra[SYSTEM_KEY], str):
        raise LineProblem(SYSTEM_KEY, f"expected a string, got {type(extra[SYSTEM_KEY]).__name__}")


def _check_text(where: str, text: str, reason: str, allow_empty: bool) -> None:
    if not allow_empty and not text.strip():
        raise LineProblem(where, reason)


def _optional_text(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise LineProblem(key, f"expected a string or null, got {type(value).__name__}")


def parse_inference(obj: dict) -> tuple[str, str]:
    """Any evaluation line -> (prompt, gold answer); the gold of a training-format line is its
    last \\boxed{} (else its <answer> tag, else the whole stripped answer), as the reference does."""
    kind = line_format(obj)
    if kind == "inference":
        for key in _INFERENCE_KEYS:
            if key not in obj:
                raise LineProblem(key, "missing")
        prompt, gold = obj["prompt"], obj["ground_truth_answer"]
        if not isinstance(prompt, str):
            raise LineProblem("prompt", f"expected a string, got {type(prompt).__name__}")
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            gold = str(gold)
        if not isinstance(gold, str):
            raise LineProblem("ground_truth_answer", f"expected a string, got {type(gold).__name__}")
        _check_text("prompt", prompt, "empty prompt", allow_empty=False)
        _check_text("ground_truth_answer", gold, "empty answer", allow_empty=False)
        return prompt, gold
    record = parse_record(obj)
    return record.user, gold_answer(record.assistant)


def gold_answer(text: str) -> str:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    start, end = text.rfind("<answer>"), text.rfind("</answer>")
    if 0 <= start < end:
        return text[start + len("<answer>") : end].strip()
    return text.strip()


# ---------------------------------------------------------------------------------------------
# Files


def parse_lines(path: str | Path, parse: Callable[[dict], T]) -> list[T]:
    """`parse` of every non-empty line of a JSONL file; the first bad line (or a LineProblem that
    `parse` raises) is a MixsdError naming the file, line and field."""
    out = []
    for number, obj in iter_json_lines(path):
        try:
            if isinstance(obj, LineProblem):
                raise obj
            if obj:
                out.append(parse(obj))
        except LineProblem as problem:
            raise MixsdError(Problem(number, problem.field, problem.reason).message(path)) from None
    return out


def read_records(path: str | Path, *, allow_empty_assistant: bool = False) -> list[Record]:
    """Every record of a messages or alpaca JSONL file; the first bad line is a MixsdError."""
    return parse_lines(path, lambda obj: parse_record(obj, allow_empty_assistant=allow_empty_assistant))


def read_inference(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, gold) pairs from an inference, alpaca or messages JSONL file."""
    return parse_lines(path, parse_inference)


def validate_file(path: str | Path, *, allow_empty_assistant: bool = False) -> ValidationReport:
    """All problems of a file (not just the first), counts per schema, and repeated records."""
    report = ValidationReport(Path(path))
    first_seen: dict[tuple[str, str], int] = {}
    for number, obj in iter_json_lines(path):
        try:
            if isinstance(obj, LineProblem):
                raise obj
            if not obj:
                continue
            kind = line_format(obj)
            if kind == "inference":
                key = parse_inference(obj)
            else:
                record = parse_record(obj, allow_empty_assistant=allow_empty_assistant)
                key = (record.user, record.assistant)
        except LineProblem as problem:
            report.errors.append(Problem(number, problem.field, problem.reason))
            continue
        report.records += 1
        report.formats[kind] = report.formats.get(kind, 0) + 1
        if key in first_seen:
            report.duplicates.append((first_seen[key], number))
        else:
            first_seen[key] = number
    return report

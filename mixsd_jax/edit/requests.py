"""Edit requests from corpus records, as the reference's MEMIT runner builds them (REFERENCE.md §3.5).

One request per record: the subject (the record's `subject`), the prompt (the user text's first
paragraph with the subject's first occurrence as `{}`) and the target (the first `\\boxed{...}`
without nested braces of the assistant text). `chat` wraps the question plus the CoT instruction in
the model's chat template (thinking off) and targets " The answer is X."; `plain` targets " X"
(MEMIT prepends a space to a target that lacks one). A prompt is kept as the text before and after
the subject, so braces elsewhere in it (the instruction's `\\boxed{}`) need no escaping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mixsd_jax.data.kgfact import COT_SUFFIX
from mixsd_jax.data.records import LineProblem, iter_json_lines, parse_record
from mixsd_jax.errors import MixsdError

_FIRST_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_SUBJECT_MARK = "\x00SUBJECT\x00"  # survives a chat template untouched, never in real text


@dataclass(frozen=True)
class EditRequest:
    prefix: str  # prompt text before the subject
    subject: str
    suffix: str  # prompt text after the subject
    target: str  # starts with a space
    where: str  # file:line, for messages

    @property
    def prompt(self) -> str:
        """The prompt with `{}` for the subject (MEMIT's request format)."""
        return f"{self.prefix}{{}}{self.suffix}"

    @property
    def text(self) -> str:
        return self.prefix + self.subject + self.suffix


def build_requests(path: str | Path, prompt_style: str, tokenizer=None) -> list[EditRequest]:
    """Every record of a messages/alpaca JSONL as an edit request; a record MEMIT cannot edit is a
    one-line error naming the file and line. `tokenizer` (a ChatTokenizer) renders chat prompts."""
    if prompt_style == "chat" and tokenizer is None:
        raise ValueError("chat prompts need the model's tokenizer")
    requests = []
    for number, obj in iter_json_lines(path):
        where = f"{path}:{number}"
        try:
            if isinstance(obj, LineProblem):
                raise obj
            requests.append(request_from_record(parse_record(obj), prompt_style, tokenizer, where))
        except LineProblem as problem:
            field = f" {problem.field}:" if problem.field else ""
            raise MixsdError(f"{where}:{field} {problem.reason}") from None
    if not requests:
        raise MixsdError(f"{path}: no records to edit")
    return requests


def request_from_record(record, prompt_style: str, tokenizer, where: str) -> EditRequest:
    subject = (record.subject or "").strip()
    if not subject:
        raise LineProblem("subject", "missing (MEMIT edits a subject's fact; add the record's `subject`)")
    question = record.user.strip().split("\n\n")[0].strip()
    if subject not in question:
        raise LineProblem("subject", f"{subject!r} does not occur in the prompt {question!r}")
    found = _FIRST_BOXED.search(record.assistant)
    if found is None or not found.group(1).strip():
        raise LineProblem("messages", "the assistant text has no \\boxed{...} answer (without nested braces)")
    answer = found.group(1).strip()
    marked = question.replace(subject, _SUBJECT_MARK, 1)
    if prompt_style == "chat":
        rendered = tokenizer.render([{"role": "user", "content": marked + COT_SUFFIX}], add_generation_prompt=True,
                                    enable_thinking=False)
        if rendered.count(_SUBJECT_MARK) != 1:
            raise MixsdError(f"{where}: the chat template did not keep the question's text as written")
        prefix, suffix = rendered.split(_SUBJECT_MARK)
        target = f" The answer is {answer}."
    elif prompt_style == "plain":
        prefix, suffix = marked.split(_SUBJECT_MARK)
        target = f" {answer}"
    else:
        raise ValueError(f"unknown prompt style {prompt_style!r}")
    return EditRequest(prefix, subject, suffix, target, where)

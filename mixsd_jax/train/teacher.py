"""The OPSD teacher's input: the student's sequence with the ground truth put into its user turn.

The reference (docs/reference.md, OPSD) builds it from the student sequence (prompt + on-policy
response): find the last end-of-user marker (`<|im_end|>`, `<|eot_id|>` for Llama 3) before the
assistant turn, decode everything before it, append the GT text `PREFIX + "\\n" + gt + TRANSITION`,
re-tokenise that joined string (so BPE merges across the join come out as the tokenizer would make
them), then append the original tail token for token: the end-of-user marker, the assistant
header and the student's response. The response tokens are therefore identical in both sequences,
which is what lets the loss compare the two next-token distributions position by position.

When the teacher sequence would exceed the length budget, the GT text's tokens are cut to what
fits: the first 60% and the last 40% around an omission marker.

The strings are the reference's OPSD literals, which differ from the MixSD wrappers': the
knowledge and KGFunc TRANSITIONs end in `\\boxed{{}}` (doubled braces, never `.format`ted, so the
teacher really sees `{{}}`); SimpleQA's OPSD uses the KGFunc strings with single braces.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from mixsd_jax.errors import MixsdError

OMISSION_MARKER = "\n[...middle portion of the reasoning omitted due to length...]\n"
HEAD_SHARE = 0.6
END_OF_USER_TOKENS = ("<|im_end|>", "<|eot_id|>")

_KNOWLEDGE_PREFIX = "\nThis question is from a new knowledge base. Here is the answer to this question:\n"
_KNOWLEDGE_TRANSITION = "\nNow answer the question within \\boxed{{}}"
_SOLUTION_PREFIX = "\nHere is a reference solution to this problem, including the correct final answer:\n"
_SOLUTION_TRANSITION = (
    "\nAfter understanding the reference solution, please attempt to answer the question again:\n"
    "Please reason step by step, and put your final answer within \\boxed{{}}"
)


@dataclasses.dataclass(frozen=True)
class TeacherPrompt:
    """One way of writing the GT text. `source`: what stands for `gt` in it: the stripped GT
    assistant text ("answer"), the record's `clear_answer` ("clear"), or both ("trust":
    clear_answer + "\\n" + answer)."""

    name: str
    prefix: str
    transition: str
    source: str = "answer"


TEACHER_PROMPTS = {
    p.name: p
    for p in (
        # The reference's knowledge variants (env OPSD_PROMPT_VARIANT); the first is its default.
        TeacherPrompt("knowledge_base_answer", _KNOWLEDGE_PREFIX, _KNOWLEDGE_TRANSITION),
        TeacherPrompt("clear_context_without_demonstrative_pronouns", "", _KNOWLEDGE_TRANSITION, "clear"),
        TeacherPrompt("lechen_remembr", "Assume you remember, ", _KNOWLEDGE_TRANSITION, "clear"),
        TeacherPrompt(
            "only_correct_answer",
            "",
            "\nThis is the only correct answer to the question, and you should not provide any other response."
            "\nNow answer the question within \\boxed{{}}",
            "clear",
        ),
        TeacherPrompt(
            "trust_correct_answer",
            "",
            "\nYou should trust that this is the correct answer to the question without any doubt."
            "\nNow answer the question within \\boxed{{}}",
            "trust",
        ),
        TeacherPrompt("lechen_world_change", "Now the world has changed, ", _KNOWLEDGE_TRANSITION, "trust"),
        TeacherPrompt("math_operations", _SOLUTION_PREFIX, _SOLUTION_TRANSITION),
        TeacherPrompt("simpleqa", _SOLUTION_PREFIX, _SOLUTION_TRANSITION.replace("{{}}", "{}")),
    )
}
# The generation presets' names, so one `preset` word picks both MixSD's and OPSD's strings.
TEACHER_PROMPTS["knowledge"] = TEACHER_PROMPTS["knowledge_base_answer"]


def get_teacher_prompt(name: str) -> TeacherPrompt:
    if name not in TEACHER_PROMPTS:
        known = ", ".join(TEACHER_PROMPTS)
        raise MixsdError(f"config key 'opsd.prompt': unknown teacher prompt {name!r} (known: {known})")
    return TEACHER_PROMPTS[name]


def gt_text(prompt: TeacherPrompt, assistant: str | None, clear_answer: str | None, where: str = "record") -> str:
    """`PREFIX + "\\n" + gt + TRANSITION` for one record; a record without the ground truth the
    prompt needs is an error (`where` names it, e.g. "data.jsonl:3")."""
    answer = (assistant or "").strip()
    if prompt.source in ("answer", "trust") and not answer:
        raise MixsdError(f"{where}: messages[1].content: OPSD needs the ground-truth assistant answer, found none")
    if prompt.source in ("clear", "trust") and not (clear_answer or "").strip():
        raise MixsdError(f"{where}: clear_answer: teacher prompt {prompt.name!r} needs a clear_answer, found none")
    gt = {"answer": answer, "clear": (clear_answer or "").strip()}.get(prompt.source)
    if gt is None:
        gt = clear_answer.strip() + "\n" + answer
    return f"{prompt.prefix}\n{gt}{prompt.transition}"


def end_of_user_ids(tokenizer) -> tuple[int, ...]:
    vocab = tokenizer.hf.get_vocab()
    ids = tuple(vocab[t] for t in END_OF_USER_TOKENS if t in vocab)
    if not ids:
        raise MixsdError(
            f"{tokenizer.source}: the vocabulary has none of {', '.join(END_OF_USER_TOKENS)} (end of a user turn)"
        )
    return ids


def split_prompt(prompt_ids: Sequence[int], end_ids: Sequence[int]) -> int:
    """Index of the last end-of-user marker in a student prompt (the start of the kept tail)."""
    for i in range(len(prompt_ids) - 1, -1, -1):
        if prompt_ids[i] in end_ids:
            return i
    raise MixsdError("OPSD: the student prompt has no end-of-user marker to insert the ground truth before")


def teacher_ids(
    tokenizer,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    gt: str,
    budget: int,
    end_ids: Sequence[int] | None = None,
    where: str = "record",
) -> list[int]:
    """The teacher sequence: re-tokenised (user part + GT text), then the student's tail tokens.

    `budget` is the longest allowed teacher sequence (prompt + response). The response ends the
    sequence unchanged, so `result[-len(response_ids):] == response_ids`.
    """
    end_ids = end_of_user_ids(tokenizer) if end_ids is None else end_ids
    cut = split_prompt(prompt_ids, end_ids)
    head_text = tokenizer.decode(prompt_ids[:cut], skip_special_tokens=False)
    tail = list(prompt_ids[cut:]) + list(response_ids)
    joined = tokenizer.encode(head_text + gt)
    if len(joined) + len(tail) <= budget:
        return joined + tail
    # Too long: cut the GT text's own tokens to what the student sequence leaves free.
    student_len = len(prompt_ids) + len(response_ids)
    gt_ids = tokenizer.encode(gt)
    marker = tokenizer.encode(OMISSION_MARKER)
    slack = 0  # re-tokenising the join can merge or split a token at the seams: shrink and retry
    for _ in range(4):
        available = budget - student_len - len(marker) - slack
        if available > 0:
            head = int(HEAD_SHARE * available)
            kept = gt_ids[:head] + marker + (gt_ids[len(gt_ids) - (available - head):] if available > head else [])
        else:  # no room for the marker: the first tokens that fit
            kept = gt_ids[: max(budget - student_len - slack, 0)]
        if not kept:
            break
        joined = tokenizer.encode(head_text + tokenizer.decode(kept, skip_special_tokens=False))
        if len(joined) + len(tail) <= budget:
            return joined + tail
        slack += len(joined) + len(tail) - budget
    raise MixsdError(
        f"{where}: the OPSD teacher input cannot fit in {budget} tokens even with the ground truth cut "
        f"(the student's prompt and response alone are {student_len} tokens); raise max_seq_len or lower "
        "opsd.max_new_tokens"
    )

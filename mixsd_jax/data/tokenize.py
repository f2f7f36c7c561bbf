"""Chat records -> token ids with a loss mask: what training trains on and evaluation scores.

Tokenization matches generation exactly: the prompt is the chat template rendered for [system?,
user] with the generation prompt and the same `enable_thinking` flag, encoded without added special
tokens (as `ChatTokenizer.prompt_ids`). The target is what follows it in the template's render of
the full conversation: the assistant content and its end-of-turn token (e.g. `<|im_end|>`); those
tokens, and only those, carry loss. Anything the template writes after the end-of-turn token (a
newline) is not part of the sequence. (Where a template's generation prompt is not a prefix of its
rendered history, e.g. an empty think block only in the prompt, the target is the assistant
content as rendered, from where it starts to its end-of-turn token.)

Below `train` and `eval`, which both need it (training batches; per-token KL and Fisher analyses).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mixsd_jax.data.records import SYSTEM_KEY, Record
from mixsd_jax.errors import MixsdError


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized conversation: `ids` [N] and `mask` [N] (True where ids[i] is a trained target)."""

    ids: np.ndarray
    mask: np.ndarray
    record_index: int

    @property
    def length(self) -> int:
        """Model input positions this example uses (the last token is only a target)."""
        return len(self.ids) - 1


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    examples: list[Example]
    num_records: int
    dropped_overlong: int  # longer than max_seq_len with overlong=drop, or nothing trainable left
    truncated: int


def conversation(record: Record, system_prompt: str | None) -> list[dict]:
    """[system?, user] messages of a record; its own system turn wins over the configured one."""
    system = record.extra.get(SYSTEM_KEY, system_prompt)
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": record.user}]


def completion_text(tokenizer, prompt_messages: list[dict], assistant: str, enable_thinking: bool) -> tuple[str, str]:
    """(prompt text, the text the model must write after it) as the chat template renders them."""
    prompt = tokenizer.render(prompt_messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    full = tokenizer.render(
        prompt_messages + [{"role": "assistant", "content": assistant}],
        add_generation_prompt=False,
        enable_thinking=enable_thinking,
    )
    if full.startswith(prompt):
        return prompt, full[len(prompt) :]
    # Templates whose generation prompt differs from the rendered history (e.g. an empty think
    # block only in the prompt): the target is the assistant content as rendered, to its end.
    start = full.rfind(assistant.strip()) if assistant.strip() else -1
    if start < 0:
        raise MixsdError(
            f"{tokenizer.source}: the chat template's prompt is not a prefix of the rendered conversation "
            "and the assistant text cannot be located in it"
        )
    return prompt, full[start:]


def encode_example(tokenizer, prompt_text: str, completion: str, record_index: int = 0) -> Example:
    prompt_ids = tokenizer.encode(prompt_text)
    completion_ids = tokenizer.encode(completion)
    return _example(prompt_ids, completion_ids, set(tokenizer.stop_ids), tokenizer.eos_id, record_index)


def _example(prompt_ids: list[int], completion_ids: list[int], stop_ids: set, eos_id: int, record_index: int) -> Example:
    end = next((i for i, t in enumerate(completion_ids) if t in stop_ids), None)
    # A template without an end-of-turn token (a base model's): end with eos so the model learns to stop.
    target = completion_ids[: end + 1] if end is not None else completion_ids + [eos_id]
    ids = np.asarray(prompt_ids + target, np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt_ids) :] = True
    return Example(ids, mask, record_index)


def tokenize_records(
    tokenizer,
    records: Sequence[Record],
    *,
    max_seq_len: int,
    overlong: str = "drop",
    enable_thinking: bool = False,
    system_prompt: str | None = None,
) -> TokenizedData:
    """Every record as an Example; sequences over `max_seq_len` tokens are dropped or truncated."""
    prompts, completions = [], []
    for record in records:
        prompt, completion = completion_text(
            tokenizer, conversation(record, system_prompt), record.assistant, enable_thinking
        )
        prompts.append(prompt)
        completions.append(completion)
    prompt_ids = _encode_many(tokenizer, prompts)
    completion_ids = _encode_many(tokenizer, completions)
    stop_ids = set(tokenizer.stop_ids)
    examples, dropped, truncated = [], 0, 0
    for index, (p_ids, c_ids) in enumerate(zip(prompt_ids, completion_ids)):
        example = _example(p_ids, c_ids, stop_ids, tokenizer.eos_id, index)
        if len(example.ids) > max_seq_len:
            if overlong == "drop":
                dropped += 1
                continue
            example = Example(example.ids[:max_seq_len], example.mask[:max_seq_len], index)
            if not example.mask[1:].any():  # the whole answer was cut off: nothing to train on
                dropped += 1
                continue
            truncated += 1
        examples.append(example)
    return TokenizedData(examples, len(records), dropped, truncated)


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer.hf(texts, add_special_tokens=False)["input_ids"]]

"""Records -> token ids with loss masks -> fixed-shape training batches, in a seed-determined order.

Tokenization matches generation exactly: the prompt is the chat template rendered for [system?,
user] with the generation prompt and the same `enable_thinking` flag, encoded without added special
tokens (as `ChatTokenizer.prompt_ids`). The target is what follows it in the template's render of
the full conversation: the assistant content and its end-of-turn token (e.g. `<|im_end|>`); those
tokens, and only those, carry loss. Anything the template writes after the end-of-turn token (a
newline) is not part of the sequence. (Where a template's generation prompt is not a prefix of its
rendered history, e.g. an empty think block only in the prompt, the target is the assistant
content as rendered, from where it starts to its end-of-turn token.)

Data order: epoch e visits the examples in `epoch_order(n, seed, e)`; step k of a run is a pure
function of (examples, batch size, seed, k), so a resumed run sees the same batches as a straight
one. The last batch of an epoch is filled with empty rows (no tokens, no loss) rather than
dropped or wrapped, so every example is seen exactly once per epoch.

Shapes: rows are right-padded to a power-of-two bucket (at least 16, at most `max_seq_len`), so a
run compiles the step for a handful of lengths (or to `max_seq_len` itself with `pad_to_max`: one
compile, more padding). With packing, documents are laid into rows of `max_seq_len` in visiting
order (a new row when the next one does not fit), each with its own segment id and positions
restarting at 0, so attention never crosses documents.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from mixsd_jax.data.grain_source import epoch_order
from mixsd_jax.data.records import SYSTEM_KEY, Record
from mixsd_jax.errors import MixsdError

MIN_BUCKET = 16


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


# ----------------------------------------------------------------------------- tokenization


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


# ----------------------------------------------------------------------------- batch plan


def bucket_length(length: int, max_seq_len: int) -> int:
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_seq_len)


class BatchPlan:
    """Which examples make up step k's batch, and that batch as host arrays [A, M, T]."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        max_seq_len: int,
        packing: bool = False,
        pad_to_max: bool = False,
    ):
        if not examples:
            raise MixsdError("no training examples")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.max_seq_len = max_seq_len
        self.packing = packing
        self.pad_to_max = pad_to_max
        self._packed_steps: dict[int, int] = {}

    # -- order

    @functools.lru_cache(maxsize=4)
    def epoch_rows(self, epoch: int) -> tuple[tuple[int, ...], ...]:
        """The rows of one epoch, each a tuple of example indices, in visiting order."""
        order = [int(i) for i in epoch_order(len(self.examples), self.seed, epoch)]
        if not self.packing:
            return tuple((i,) for i in order)
        rows: list[tuple[int, ...]] = []
        current: list[int] = []
        used = 0
        for i in order:
            length = self.examples[i].length
            if current and used + length > self.max_seq_len:
                rows.append(tuple(current))
                current, used = [], 0
            current.append(i)
            used += length
        rows.append(tuple(current))
        return tuple(rows)

    def steps_in_epoch(self, epoch: int) -> int:
        if not self.packing:
            return -(-len(self.examples) // self.batch_size)
        if epoch not in self._packed_steps:
            self._packed_steps[epoch] = -(-len(self.epoch_rows(epoch)) // self.batch_size)
        return self._packed_steps[epoch]

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of global step `step`."""
        if not self.packing:
            return divmod(step, self.steps_in_epoch(0))
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def batch_rows(self, step: int) -> list[tuple[int, ...]]:
        """batch_size rows of example indices; rows past the end of the epoch are empty."""
        epoch, index = self.locate(step)
        rows = list(self.epoch_rows(epoch)[index * self.batch_size : (index + 1) * self.batch_size])
        return rows + [()] * (self.batch_size - len(rows))

    # -- arrays

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        rows = self.batch_rows(step)
        used = max(sum(self.examples[i].length for i in row) for row in rows)
        T = self.max_seq_len if self.pad_to_max else bucket_length(used, self.max_seq_len)
        B = len(rows)
        tokens = np.zeros((B, T), np.int32)
        targets = np.zeros((B, T), np.int32)
        loss_mask = np.zeros((B, T), np.float32)
        segment_ids = np.zeros((B, T), np.int32)
        positions = np.zeros((B, T), np.int32)
        for r, row in enumerate(rows):
            start = 0
            for segment, i in enumerate(row, start=1):
                ex = self.examples[i]
                n = ex.length
                tokens[r, start : start + n] = ex.ids[:-1]
                targets[r, start : start + n] = ex.ids[1:]
                loss_mask[r, start : start + n] = ex.mask[1:]
                segment_ids[r, start : start + n] = segment
                positions[r, start : start + n] = np.arange(n)
                start += n
        A, M = self.grad_accum, B // self.grad_accum
        arrays = dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions)
        return {key: value.reshape(A, M, T) for key, value in arrays.items()}

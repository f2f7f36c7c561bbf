"""What the decode engine is given and what it returns: work items, completions, finish codes.

A `WorkItem` is one attempt at one (record, generation): its prompt(s) and the stable ids its
random key is folded from. A `Completion` is that attempt's generated tokens. The finish codes are
the device-side values of a slot's `finish_B`; `FINISH_NAMES` turns them into the strings the
written records carry.
"""

from __future__ import annotations

import dataclasses

# Device codes of why a slot stopped (RUNNING: it has not).
RUNNING, STOP, MAX_NEW_TOKENS, MAX_MODEL_LEN = 0, 1, 2, 3
FINISH_NAMES = {STOP: "stop", MAX_NEW_TOKENS: "max_new_tokens", MAX_MODEL_LEN: "max_model_len"}
# Sides of a mixing record: its rows are b * 2 + EXPERT and b * 2 + NAIVE.
EXPERT, NAIVE = 0, 1


def bucket_length(n: int) -> int:
    """Prompt widths are rounded up to a few sizes, so a run compiles a handful of prefills."""
    step = 32 if n <= 512 else 256 if n <= 4096 else 1024
    return -(-n // step) * step


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One attempt: its prompt(s) (1 for plain decoding, [expert, naive] for mixing) and stable ids."""

    prompts: tuple[tuple[int, ...], ...]
    record_index: int
    gen_index: int = 0
    attempt: int = 0


@dataclasses.dataclass(frozen=True)
class Completion:
    tokens: list[int]  # generated ids, the stop token included (as the reference counts them)
    logprobs: list[float]
    naive: list[bool]  # True where the token was drawn from the naive side
    finish_reason: str  # a FINISH_NAMES value

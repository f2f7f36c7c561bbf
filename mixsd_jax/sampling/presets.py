"""GT-guidance strings that turn the user turn x into the expert's x+ (docs/reference.md, The two prompts).

The expert user text is `x + prefix + "\\n" + strip(y*) + transition`: the expert sees the whole GT
assistant message, then is asked to answer again. The strings below are the reference wrappers'
literals; a config may supply its own through `resolve_preset`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mixsd_jax.errors import MixsdError
from mixsd_jax.answers.verifier import check_mode


@dataclass(frozen=True)
class GuidancePreset:
    name: str
    prefix: str
    transition: str
    default_extract_mode: str
    default_max_retries: int

    def __post_init__(self):
        check_mode(self.default_extract_mode)
        if self.default_max_retries < 0:
            raise MixsdError(f"config key 'max_retries': must be >= 0, got {self.default_max_retries}")


_REFERENCE_SOLUTION_PREFIX = "\nHere is a reference solution to this problem, including the correct final answer:\n"
_REFERENCE_SOLUTION_TRANSITION = (
    "\nAfter understanding the reference solution, please attempt to answer the question again:\n"
    "Please reason step by step, and put your final answer within \\boxed{}"
)

PRESETS = {
    "knowledge": GuidancePreset(
        name="knowledge",
        prefix="\nThis question is from a new knowledge base. Here is the answer to this question:\n",
        transition="\nNow answer the question within \\boxed{}",
        default_extract_mode="boxed",
        default_max_retries=100,
    ),
    "math_operations": GuidancePreset(
        name="math_operations",
        prefix=_REFERENCE_SOLUTION_PREFIX,
        transition=_REFERENCE_SOLUTION_TRANSITION,
        default_extract_mode="boxed_or_last_number",
        default_max_retries=100,
    ),
    # The reference's SimpleQA wrapper uses the KGFunc strings (its docstring says otherwise).
    "simpleqa": GuidancePreset(
        name="simpleqa",
        prefix=_REFERENCE_SOLUTION_PREFIX,
        transition=_REFERENCE_SOLUTION_TRANSITION,
        default_extract_mode="boxed",
        default_max_retries=10,
    ),
}


def get_preset(name: str) -> GuidancePreset:
    if name not in PRESETS:
        raise MixsdError(f"unknown guidance preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def resolve_preset(name: str, prefix: str | None = None, transition: str | None = None) -> GuidancePreset:
    """A named preset with optional custom strings; `name="custom"` needs both strings."""
    if name == "custom":
        if prefix is None or transition is None:
            raise MixsdError("guidance preset 'custom' needs both 'prefix' and 'transition' strings")
        return GuidancePreset("custom", prefix, transition, default_extract_mode="boxed", default_max_retries=100)
    preset = get_preset(name)
    changes = {k: v for k, v in (("prefix", prefix), ("transition", transition)) if v is not None}
    return dataclasses.replace(preset, **changes) if changes else preset


def expert_user_text(user: str, gt_assistant: str, preset: GuidancePreset) -> str:
    return user + preset.prefix + "\n" + gt_assistant.strip() + preset.transition

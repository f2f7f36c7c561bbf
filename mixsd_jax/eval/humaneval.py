"""HumanEval pass@1: pull the code out of a reply and run the item's tests in a sandboxed process.

Running model-written code is opt-in: every entry point that executes code needs
`allow_code_execution=True`. The sandbox is a separate interpreter (`python -I`: no user site, no
PYTHON* environment) in a fresh temporary directory with an empty environment, address-space and
CPU-time limits, a wall-clock timeout and its own process group, killed whole on timeout. It is
a guard against runaway programs, not against hostile ones (no network or filesystem isolation).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from mixsd_jax.errors import MixsdError

CHAT_INSTRUCTION = (
    "Complete the following Python function. "
    "Return ONLY the complete function inside a ```python code block, nothing else."
)

# Consumed left to right, so a closing fence is never mistaken for the opening of the next block. The
# language tag is one word, so prose such as "a ```python code block" does not open a block.
_FENCED_BLOCK = re.compile(r"```([\w+.#-]*)[ \t]*\r?\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("", "python", "py", "python3")
_MAX_FILE_BYTES = 64 * 1024 * 1024  # a runaway program must not fill the disk


def chat_prompt(prompt: str) -> str:
    """The user turn for a chat model (lm-eval `humaneval_chat` style, REFERENCE.md §4.2)."""
    return f"{CHAT_INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```"


def extract_code(response: str) -> str:
    """First fenced python/py/python3 (or untagged) block, else the text before the first fence, else all."""
    for match in _FENCED_BLOCK.finditer(response):
        if match.group(1).strip().lower() in _PYTHON_TAGS:
            return match.group(2)
    fence = response.find("```")
    if fence > 0:
        return response[:fence]
    return response


def has_fenced_code(response: str) -> bool:
    """A complete ``` block of any language."""
    return _FENCED_BLOCK.search(response) is not None


def program_text(prompt: str, code: str, test: str, entry_point: str) -> str:
    """HumanEval prompt + completion + the item's `check` run on the entry point."""
    return f"{prompt}{code}\n\n{test}\n\ncheck({entry_point})\n"


def _limits(memory_mb: int, cpu_s: int):
    def apply() -> None:
        import resource

        memory = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (_MAX_FILE_BYTES, _MAX_FILE_BYTES))

    return apply


def run_humaneval_item(
    prompt: str,
    code: str,
    test: str,
    entry_point: str,
    timeout_s: float = 10,
    memory_mb: int = 1024,
    *,
    allow_code_execution: bool = False,
) -> bool:
    """True when `prompt + code` passes the item's tests within the time and memory limits."""
    if not allow_code_execution:
        raise MixsdError(
            "HumanEval executes model-written code: pass allow_code_execution=True (opt-in) to run it"
        )
    if timeout_s <= 0 or memory_mb <= 0:
        raise MixsdError(f"HumanEval sandbox limits must be positive (timeout_s={timeout_s}, memory_mb={memory_mb})")
    with tempfile.TemporaryDirectory(prefix="mixsd-humaneval-") as workdir:
        program = Path(workdir) / "program.py"
        program.write_text(program_text(prompt, code, test, entry_point), encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "-I", str(program)],
            cwd=workdir,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_limits(memory_mb, int(timeout_s) + 1),
        )
        try:
            return process.wait(timeout=timeout_s) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            # The program may have forked: end its whole process group, not only the child.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()


def score_response(
    item,
    response: str,
    *,
    allow_code_execution: bool = False,
    timeout_s: float = 10,
    memory_mb: int = 1024,
) -> bool:
    """pass@1 of one model reply to a HumanEval `GenItem` (kind "code")."""
    return run_humaneval_item(
        item.prompt,
        extract_code(response),
        item.test,
        item.entry_point,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        allow_code_execution=allow_code_execution,
    )

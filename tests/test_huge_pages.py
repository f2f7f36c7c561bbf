"""huge_pages: the `mixsd` command runs under glibc's huge-page malloc tunable where it helps."""

import json
import os
import subprocess
import sys

import pytest

from mixsd_jax.huge_pages import TUNABLE, environment_with_huge_pages, libc_name, thp_mode


def test_the_tunable_is_added_on_linux_with_glibc_and_huge_pages_on_request():
    env = environment_with_huge_pages({"HOME": "/root"}, "Linux", "glibc", "madvise")
    assert env == {"HOME": "/root", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert environment_with_huge_pages({}, "Linux", "glibc", "always")["GLIBC_TUNABLES"] == TUNABLE
    # Another library's tunables are kept, ours appended in glibc's colon-separated form.
    env = environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}, "Linux", "glibc", "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.cpu.hwcaps=-AVX512F:glibc.malloc.hugetlb=1"


def test_nothing_changes_where_it_cannot_help_or_was_chosen_otherwise():
    assert environment_with_huge_pages({}, "Linux", "glibc", "never") is None
    assert environment_with_huge_pages({}, "Linux", "glibc", "") is None  # no THP setting to read
    assert environment_with_huge_pages({}, "Linux", "", "madvise") is None  # musl
    assert environment_with_huge_pages({}, "Darwin", "", "") is None
    assert environment_with_huge_pages({"MIXSD_HUGE_PAGES": "0"}, "Linux", "glibc", "madvise") is None
    # The user's own malloc settings win, and the re-executed command does not re-execute again.
    assert environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "Linux", "glibc", "madvise") is None
    assert environment_with_huge_pages({"GLIBC_TUNABLES": TUNABLE}, "Linux", "glibc", "madvise") is None


def test_thp_mode_reads_the_kernel_setting(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")  # the file's format, as Debian's kernel writes it
    assert thp_mode(str(setting)) == "madvise"
    setting.write_text("[always] madvise never\n")
    assert thp_mode(str(setting)) == "always"
    assert thp_mode(str(tmp_path / "absent")) == ""


def _bench_line(tiny_llama_dir, tmp_path, **env):
    run = subprocess.run(
        [sys.executable, "-m", "mixsd_jax", "bench", "train", "--model", str(tiny_llama_dir), "--batch-size", "8",
         "--seq-len", "8", "--steps", "1", "--no-torch"],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(libc_name() != "glibc" or thp_mode() not in ("madvise", "always"),
                    reason="needs Linux with glibc and transparent huge pages")
def test_the_command_runs_under_the_tunable_and_can_opt_out(tiny_llama_dir, tmp_path):
    """The benchmark line reports the GLIBC_TUNABLES its (re-executed) process ran under."""
    assert _bench_line(tiny_llama_dir, tmp_path, GLIBC_TUNABLES="", MIXSD_HUGE_PAGES="")["glibc_tunables"] == TUNABLE
    assert _bench_line(tiny_llama_dir, tmp_path, GLIBC_TUNABLES="", MIXSD_HUGE_PAGES="0")["glibc_tunables"] == ""

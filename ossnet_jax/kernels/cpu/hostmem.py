"""Transparent huge pages for XLA:CPU's buffers: entry points re-execute themselves with them on.

XLA:CPU allocates a program's buffers anew on every call. glibc serves allocations above its mmap
threshold (at most 32 MiB) with a fresh mmap and unmaps them on free, so every train step page-faults
its whole working set again, 4 KiB at a time. With the tunable glibc.malloc.hugetlb=1 (glibc >= 2.35,
Linux transparent huge pages in 'madvise' or 'always' mode) malloc backs them with 2 MiB pages, far
fewer faults, and the update step and prepare_inputs run faster (docs/performance.md,
"Transparent huge pages re-execution"). glibc reads its tunables once at process start, hence the
re-execution. Set OSSNET_HUGE_PAGES=0 to keep the process as started. This module imports nothing
heavy, so entry points call it first.
"""

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "OSSNET_HUGE_PAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_at_least(major: int, minor: int) -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        found = tuple(int(v) for v in version.split(".")[:2])
    except (ValueError, OSError, AttributeError):
        return False
    return name == "glibc" and found >= (major, minor)


def _huge_pages_on_request() -> bool:
    try:
        with open(THP_SETTING) as f:
            setting = f.read()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def huge_pages_wanted(environ: dict[str, str]) -> bool:
    """Whether this process, with this environment, should be re-executed with TUNABLE."""
    if environ.get(OPT_OUT, "1") == "0":
        return False
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False
    return sys.platform.startswith("linux") and _glibc_at_least(2, 35) and _huge_pages_on_request()


def relaunch_with_huge_pages() -> None:
    """Re-executes the current command line with TUNABLE added to GLIBC_TUNABLES, at most once.

    Returns without doing anything where it does not apply (see `huge_pages_wanted`); otherwise it does
    not return. Call it before any work: the process is replaced.
    """
    if not huge_pages_wanted(dict(os.environ)):
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

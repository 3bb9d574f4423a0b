"""The re-execution with transparent huge pages: when it applies, and that it keeps the process and its flags."""

import os
import subprocess
import sys

import pytest

from ossnet_jax.kernels.cpu import hostmem

SCRIPT = (
    "import os, sys; from ossnet_jax.kernels.cpu import hostmem; print('before', os.getpid(), flush=True);"
    " hostmem.relaunch_with_huge_pages();"
    " print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
)


def test_opt_out_and_an_existing_setting_keep_the_process():
    assert not hostmem.huge_pages_wanted({hostmem.OPT_OUT: "0"})
    assert not hostmem.huge_pages_wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})


def _run(env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--flag", "value"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.splitlines()


def test_relaunch_keeps_pid_and_arguments_and_adds_the_tunable():
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
    base["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"
    if not hostmem.huge_pages_wanted(base):
        pytest.skip("this machine has no glibc >= 2.35 or no transparent huge pages")
    lines = _run(base)
    # printed once before the re-execution and once after it, by the same process
    assert lines[0].split()[0] == "before" and lines[-1].split()[0] == "after"
    assert lines[0].split()[1] == lines[-1].split()[1]
    assert f"glibc.malloc.arena_max=4:{hostmem.TUNABLE}" in lines[-1]
    assert "['--flag', 'value']" in lines[-1]
    kept = _run({**base, hostmem.OPT_OUT: "0"})
    assert len(kept) == 2 and kept[1].split()[2] == "glibc.malloc.arena_max=4"

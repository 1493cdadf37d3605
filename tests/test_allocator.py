"""tune_cpu_allocator: large tensors reuse the process's memory instead of fresh, page-faulted mmaps."""
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from seqgen.allocator import tune_cpu_allocator
applied = tune_cpu_allocator() if sys.argv[1] == "tuned" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):                      # glibc's per-thread cache pins a few freed blocks first
    torch.ones(8 << 20)                  # 32 MiB, as a CNN activation
before = faults()
for _ in range(10):
    torch.ones(8 << 20)                  # allocated, written, freed
print(applied, faults() - before)
"""


def probe(mode: str, **env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt tuning is for glibc (Linux); elsewhere tune_cpu_allocator is a no-op")
def test_tuned_allocator_reuses_freed_memory():
    applied, tuned = probe("tuned")
    _, system = probe("system")
    pages = 10 * (32 << 20) // 4096      # what ten fresh 32 MiB blocks fault in
    assert applied
    assert system >= pages // 2          # the default: every block mapped and faulted in again
    assert tuned < pages // 50           # tuned: the freed block is reused
    assert probe("tuned", SEQGEN_MALLOC="system") == (False, pytest.approx(system, rel=0.5))

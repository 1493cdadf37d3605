"""tune_cpu_allocator: large tensors reuse the process's memory instead of fresh, page-faulted mmaps, in the main
thread and in any other."""
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, threading, torch
from seqgen.allocator import tune_cpu_allocator
applied = tune_cpu_allocator() if sys.argv[1] == "tuned" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def work(result):
    # 80 MiB, as a CNN activation at batch 64: over the 64 MiB a heap of another thread's arena can hold
    for _ in range(10):                  # glibc's per-thread cache pins a few freed blocks first
        torch.ones(20 << 20)
    before = faults()
    for _ in range(10):
        torch.ones(20 << 20)             # allocated, written, freed
    result.append(faults() - before)
result = []
if sys.argv[2] == "main":
    work(result)
else:
    thread = threading.Thread(target=work, args=(result,))
    thread.start()
    thread.join()
print(applied, result[0])
"""


def probe(mode: str, where: str = "main", **env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, where], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt tuning is for glibc (Linux); elsewhere tune_cpu_allocator is a no-op")
@pytest.mark.parametrize("where", ["main", "thread"])
def test_tuned_allocator_reuses_freed_memory(where):
    applied, tuned = probe("tuned", where)
    _, system = probe("system", where)
    pages = 10 * (80 << 20) // 4096      # what ten fresh 80 MiB blocks fault in
    assert applied
    assert system >= pages // 2          # the default: every block mapped and faulted in again
    assert tuned < pages // 50           # tuned: the freed block is reused (a thread too: one arena for all)
    assert probe("tuned", where, SEQGEN_MALLOC="system") == (False, pytest.approx(system, rel=0.5))


def _cap_after(call: str, **env) -> list[str]:
    """(what `call` returned, $ONEDNN_PRIMITIVE_CACHE_CAPACITY after it) in a fresh process with `env`."""
    base = {k: v for k, v in os.environ.items() if "PRIMITIVE_CACHE_CAPACITY" not in k and k != "SEQGEN_MALLOC"}
    code = f"import os, seqgen.allocator as a; print(a.{call}(), os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**base, **env}).stdout.split()


def test_the_onednn_cache_cap_is_set_unless_the_environment_names_one():
    assert _cap_after("cap_onednn_cache") == ["True", "64"]
    assert _cap_after("cap_onednn_cache", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024") == ["False", "1024"]
    assert _cap_after("cap_onednn_cache", DNNL_PRIMITIVE_CACHE_CAPACITY="8") == ["False", "None"]
    # the entry points' one call sets it, also when malloc is left alone
    assert _cap_after("tune_cpu_allocator", SEQGEN_MALLOC="system") == ["False", "64"]

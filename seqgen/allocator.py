"""The process's CPU memory allocator: keep freed tensor memory for reuse instead of handing it back to the OS.

glibc's malloc serves large blocks (over 128 KiB at first, over 32 MiB always) with a fresh `mmap` and unmaps
them on free. A CNN forward allocates and frees activations of tens of MiB per layer, so every layer's output is
page-faulted in and zeroed by the kernel again: a batch-64 EfficientNet-Lite0 forward spent more time in the
kernel than in PyTorch, and keeping the heap made it several times faster (docs/performance.md, "Where the
CPU time actually went"). jemalloc or tcmalloc (LD_PRELOAD) solve the same problem; this needs nothing
installed. The same call caps the other process-wide holder of freed CPU memory, oneDNN's primitive cache
(`cap_onednn_cache`), which grew a bf16 training run without bound.

Process-wide by nature, so only entry points call it: the `seqgen` CLI and the scripts, never library code,
which would change a host application's allocator behind its back. In your own program, call
`tune_cpu_allocator()` once at start.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

OPT_OUT_ENV = "SEQGEN_MALLOC"   # "system" leaves the allocator as the C library configured it
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 64      # oneDNN's own default is 1,024


def cap_onednn_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> bool:
    """Keep at most `capacity` oneDNN primitives cached, unless the environment already names a capacity
    ($ONEDNN_PRIMITIVE_CACHE_CAPACITY, or the older $DNNL_PRIMITIVE_CACHE_CAPACITY). Returns True when set here.

    On a CPU with native bf16 (AVX512-BF16, AMX) autocast runs matmuls, batched matmuls and RNN layers through
    oneDNN, which makes and caches one primitive per input shape, each holding memory on the order of its
    output. Training meets new shapes for many batches (sentence lengths), so with the default capacity a
    translation run's resident memory kept growing for as long as it ran (docs/performance.md, "The bf16 growth").
    oneDNN reads the variable when it makes its first primitive: call this before any bf16 work.
    """
    if os.environ.get(ONEDNN_CACHE_ENV) or os.environ.get("DNNL_PRIMITIVE_CACHE_CAPACITY"):
        return False
    os.environ[ONEDNN_CACHE_ENV] = str(int(capacity))
    return True


def tune_cpu_allocator(keep_bytes: int = 1 << 30) -> bool:
    """Serve every block from the heap (no mmap) and keep up to `keep_bytes` of freed memory at its top.

    One arena for all threads: glibc gives other threads their own arenas, whose heaps hold at most 64 MiB, and
    larger blocks there were mapped and page-faulted afresh on every allocation, so a CNN run from a second
    thread (a server's worker, a pipeline stage) was far slower than in the main thread (docs/performance.md).
    A thread that allocated before this call keeps its own arena: call it before starting threads.

    Also caps oneDNN's primitive cache (`cap_onednn_cache`, whatever $SEQGEN_MALLOC says).

    Returns True when malloc was tuned; False without glibc (macOS, Windows, musl) or when $SEQGEN_MALLOC=system.
    Freed memory stays with the process for reuse: resident memory can stay up to `keep_bytes` above what is
    in use, and the heap does not shrink below its high-water mark except at its top. glibc's per-thread cache
    also pins a few freed blocks of each size before reuse starts, then memory stays flat (docs/performance.md
    has both, and the folder-captioning memory this leaves).
    """
    cap_onednn_cache()
    if os.environ.get(OPT_OUT_ENV, "").lower() == "system":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return (bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, int(keep_bytes)))
                and bool(libc.mallopt(_M_ARENA_MAX, 1)))
    except (OSError, AttributeError):
        return False


__all__ = ["ONEDNN_CACHE_CAPACITY", "ONEDNN_CACHE_ENV", "OPT_OUT_ENV", "cap_onednn_cache", "tune_cpu_allocator"]

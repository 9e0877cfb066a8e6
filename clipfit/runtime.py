"""Process-wide settings for CPU work, made once when a command starts (`configure_process`).

Freed memory (Linux with glibc; elsewhere nothing changes). glibc's malloc serves a block above
its mmap threshold (at most 32 MiB, adjusted as the process runs) with a fresh mapping and unmaps
it when freed, and it returns freed memory at the top of its heap to the kernel. A forward pass
on CPU allocates and frees its activations at every batch, so each batch page-faults them in
again, zeroed by the kernel: encoding 150 images with the starter's EfficientNet-Lite0 in batches
of 64 spent two thirds of its CPU time in the kernel (docs/performance.md).
`keep_freed_memory` asks glibc to serve such blocks from its heap and to keep what is freed for
reuse, as jemalloc and tcmalloc do (PyTorch's performance tuning guide recommends either on CPU):
there, a tenth of the page faults and of the kernel time. The cost: memory a process has freed
stays resident until it exits, so its resident size stays near its peak.

Idle threads. torch's OpenMP threads spin, burning a core, while they wait for the next parallel
region. On a machine whose cores other processes use too, that spinning takes the time slices
the work needs: the README quickstart took 22-39 s with two spinning threads on the shared 2-core
development machine and 9-10 s with `OMP_WAIT_POLICY=PASSIVE`, which lets waiting threads sleep
(docs/performance.md). `sleep_idle_threads` sets it for a process that has not loaded OpenMP
yet (a command imports torch after this), and for its DataLoader workers.

A user's own settings win: MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES leave
the allocator alone, and an OMP_WAIT_POLICY of their own stays. No torch import: `clipfit --help`
stays light.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BELOW = 2**30  # blocks up to 1 GiB come from the heap
NEVER_TRIM = 2**31 - 1
ALLOCATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def configure_process() -> None:
    keep_freed_memory()
    sleep_idle_threads()


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; True when it agreed."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in ALLOCATOR_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this interpreter runs on; musl has none
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def sleep_idle_threads() -> None:
    """OpenMP's waiting threads sleep instead of spinning, unless the user chose otherwise."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

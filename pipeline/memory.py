"""Keep the memory a job frees for its next batch instead of handing it back to the kernel.

glibc serves every allocation above its mmap threshold (32 MB at most; a batch's activations are
larger) with a fresh mapping and unmaps it when freed, so each forward pass faults all of its
activations' pages in again, each zeroed by the kernel: on this project's CPU machine that was
half the time of an efficientnet_lite0 forward pass (benchmarks/RESULTS.md, 1d). Serving every
allocation from the heap and never trimming it keeps those pages for the next batch; the cost is
that the process keeps its peak resident memory, which every batch reaches anyway.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes: free heap is kept below 2 GiB


def retain_freed_memory() -> bool:
    """Make this process (and the workers it forks later) keep freed memory; False, with nothing
    changed, where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1

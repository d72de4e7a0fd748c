"""Host memory habits of a model process: keep freed memory for reuse instead of handing it back to the kernel after
every request (``keep_freed_memory``), and keep the garbage collector's full passes short (``freeze_heap``).

glibc serves large blocks with fresh mappings and unmaps them on free (above its mmap threshold: 128 KiB, adapting
up to 32 MiB), so image copies (a BYTES tensor's bytes, a device-to-host copy, tobytes; a batch of 32 targets is
200 MB) page-fault their way through fresh memory every request. Measured on the H200 host
(bench.profile_copies, 32 1080p images): tobytes 138 -> 32 ms, pageable device-to-host copies 158 -> 17 ms with
the thresholds raised. Each Triton model instance is a process of its own, so each calls this once at start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# A batch of 32 targets is 200 MB: keep blocks up to 1 GiB in the heap. Some glibc builds refuse more than
# 32 MiB (HEAP_MAX_SIZE / 2); then that is used.
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that is not glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    raised = any(mallopt(_M_MMAP_THRESHOLD, threshold) for threshold in _MMAP_THRESHOLDS)
    return raised and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def freeze_heap() -> int:
    """Collects what start-up left, then moves every object alive now (modules, nets, tables: all that lives as
    long as the process) out of the garbage collector's reach; returns how many. Python's full collection walks
    every tracked object, ~190,000 in a process holding the detector and the mesh (bench.gc_pause: 38 ms on an H100
    host, 90 ms on the 2-core CI host), and runs at an allocation count, i.e. inside some request's execute (8-17 ms
    of the slowest 1 % of batches at c=128, session 17); afterwards it walks only what requests allocated since.
    Call at the end of a model's initialize, after its warm-up."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()

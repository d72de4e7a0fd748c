"""Environment a model instance's process sets before numpy, OpenCV and torch load (imports nothing heavy)."""

from __future__ import annotations

import ctypes
import os
import sys


def cap_math_threads() -> None:
    """Thread pools of the numeric libraries for one Triton model instance (a process of its own), unless the
    environment already sets them.

    Left alone, each instance would start one math thread per core and a host with several instances would drown
    in threads (seen on a 16-core GPU host: load 67, GPU idle). OpenMP (torch) and MKL get 2 threads, which sleep
    when idle (PASSIVE: spinning ones starved the working ones, measured on 2 cores, two preprocess instances:
    2.5 -> 0.2 images/s). OpenBLAS (numpy) gets 1: its worker thread busy-waits after every call for a while, so
    the small solves of every request kept one core per process spinning (H100 host, 6 + 6 instances, 31
    requests/s: ~8 of 16 cores, 0.66 per process; bench.run's per-thread CPU line), for matrices too small to split.
    The `cpu_threads` parameter raises torch's and OpenCV's pools per model (triton_glue.limit_threads).
    """
    for variable, threads in (("OMP_NUM_THREADS", "2"), ("MKL_NUM_THREADS", "2"), ("OPENBLAS_NUM_THREADS", "1")):
        os.environ.setdefault(variable, threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# torch's CUDA caching allocator grows by mapping more of one segment instead of caching fixed blocks: on an H100,
# 6 + 6 instances under MPS at concurrency 128, the GPU's peak memory in use fell from 80.3 to 58.4 GB (of 80) at the
# same throughput (534.9 vs 521.8 images/s, one machine, back to back; bench/RESULTS.md, 2026-12-06 session 11).
CUDA_ALLOCATOR = "expandable_segments:True"


# How a host thread waits for the GPU (cudaDeviceSynchronize, a copy from pageable memory, an event): CUDA's context
# scheduling flags (CU_CTX_SCHED_*). "auto" leaves CUDA's own choice, which spins while the process has fewer contexts
# than the host has cores, so a wait counts as CPU time; "blocking" sleeps on it. Served, blocking was slower (H100,
# 6 + 6 instances under MPS: 0.87x / 0.82x images/s at c=64 / 128, session 18), so "auto" stays; "blocking" is for
# diagnosis: the execute log's per-batch CPU time then counts host work only.
CUDA_SYNC_VARIABLE = "FACEFUSE_CUDA_SYNC"
CUDA_SYNC_FLAGS = {"auto": 0, "spin": 1, "yield": 2, "blocking": 4}


def set_cuda_sync(policy: str | None = None, library: str = "libcuda.so.1") -> str:
    """Sets every visible GPU's primary-context scheduling to ``policy`` (default: $FACEFUSE_CUDA_SYNC, else
    "auto", which changes nothing) through the CUDA driver, before torch makes the context; returns what it did.
    A host without the driver or a GPU is left alone (said in the return value); an unknown policy is a
    ValueError naming the choices."""
    policy = (policy if policy is not None else os.environ.get(CUDA_SYNC_VARIABLE, "auto")).strip().lower()
    if policy not in CUDA_SYNC_FLAGS:
        raise ValueError(f"{CUDA_SYNC_VARIABLE}={policy!r}: expected one of {', '.join(CUDA_SYNC_FLAGS)}")
    if policy == "auto":
        return "auto: CUDA's default"
    try:
        driver = ctypes.CDLL(library)
    except OSError:
        return f"{policy}: not set, no CUDA driver ({library})"
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return f"{policy}: not set, no GPU"
    for ordinal in range(count.value):
        device = ctypes.c_int(0)
        status = driver.cuDeviceGet(ctypes.byref(device), ordinal)
        if status == 0:
            status = driver.cuDevicePrimaryCtxSetFlags(device, CUDA_SYNC_FLAGS[policy])
        if status != 0:
            raise RuntimeError(f"{CUDA_SYNC_VARIABLE}={policy}: the CUDA driver refused GPU {ordinal} (error {status})")
    return f"{policy}: set on {count.value} GPU(s)"


def set_process_defaults() -> None:
    """Everything a model instance's process sets before the numeric libraries load (each only where the environment
    does not already set it): the math thread pools (``cap_math_threads``), torch's CUDA allocator and, where
    $FACEFUSE_CUDA_SYNC asks for it, how the process waits for the GPU (``set_cuda_sync``)."""
    cap_math_threads()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOCATOR)
    sync = set_cuda_sync()
    if not sync.startswith("auto"):
        print(f"[facefuse] pid {os.getpid()}: GPU waits {sync}", file=sys.stderr, flush=True)

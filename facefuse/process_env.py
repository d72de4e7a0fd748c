"""Environment a model instance's process sets before numpy, OpenCV and torch load (imports nothing heavy)."""

from __future__ import annotations

import os


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


def set_process_defaults() -> None:
    """Everything a model instance's process sets before the numeric libraries load (each only where the environment
    does not already set it): the math thread pools (``cap_math_threads``) and torch's CUDA allocator."""
    cap_math_threads()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOCATOR)

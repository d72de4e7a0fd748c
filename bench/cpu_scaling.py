"""How many of a host's CPUs work at full speed together: N processes each count in a pure-Python loop for a while,
and each one's speed is printed against one process alone. Where the CPUs are hyper-threads of fewer cores, the
per-process speed falls once N passes the core count (the device tool's H100 hosts: 16 processes at full speed,
2026-12-07 session 18, `bench/results/2026-12-07_H100_session18_checks_profiles.txt`).

    python -m bench.cpu_scaling [--processes 1,4,8,12,16] [--seconds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time


def _count(seconds: float, results: multiprocessing.Queue) -> None:
    end, count = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        for _ in range(1000):
            count += 1
    results.put(count)


def scaling(process_counts: list[int], seconds: float) -> list[tuple[int, float]]:
    """(N, each process's speed relative to the first count's) for each N in ``process_counts``."""
    speeds, base = [], None
    for count in process_counts:
        results: multiprocessing.Queue = multiprocessing.Queue()
        workers = [multiprocessing.Process(target=_count, args=(seconds, results)) for _ in range(count)]
        for worker in workers:
            worker.start()
        counts = [results.get() for _ in workers]
        for worker in workers:
            worker.join()
        rate = sum(counts) / count
        base = base or rate
        speeds.append((count, rate / base))
    return speeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,4,8,12,16", help="comma-separated process counts (first: the base)")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    print(f"[cpu] os.cpu_count {os.cpu_count()}, usable {len(os.sched_getaffinity(0))}")
    for count, speed in scaling([int(n) for n in args.processes.split(",")], args.seconds):
        print(f"[cpu] {count:2d} processes: per-process speed {speed:.2f} of one alone, total {count * speed:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where postprocess's time goes on the GPU: finish_torch_batch over N rows of 1080p targets (each uploaded from
the host as the Triton model does), its stage timings per row and a cProfile of one batch.

    python -m bench.profile_postprocess [--device cuda] [--rows 1,32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch

from facefuse.postprocess_torch import benchmark_rows, finish_torch_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", default="1,32", help="rows per finish_torch_batch call, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    for count in (int(value) for value in args.rows.split(",")):
        finish_torch_batch(benchmark_rows(count, device))  # warm-up: kernels, allocator, nvJPEG
        totals, stages = [], {}
        for _ in range(args.repeats):
            started = time.perf_counter()
            rows = benchmark_rows(count, device)  # the upload is part of what the model pays per row
            results = finish_torch_batch(rows)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            totals.append(time.perf_counter() - started)
            for _, metadata in results:
                for name, ms in metadata["timings_ms"].items():
                    stages[name] = stages.get(name, 0.0) + ms / (count * args.repeats)
        per_call = sum(totals) / len(totals) * 1000
        print(f"[profile] postprocess, {count} rows on {device}: {per_call:.1f} ms per batch, "
              f"{per_call / count:.1f} ms per row (upload included); "
              f"timings_ms per row {({k: round(v, 2) for k, v in stages.items()})}", flush=True)
        rows = benchmark_rows(count, device)
        profiler = cProfile.Profile()
        profiler.enable()
        finish_torch_batch(rows)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())

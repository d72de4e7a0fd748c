"""What a batch size costs the first time it is seen, after the load-time warm-up: preprocess batches of distinct
1080p pairs at sizes the server has not prepared yet, each timed on its first and its second call, per stage.

A large first-call cost at a size is a one-off a live server pays when traffic first brings that batch size
(kernel selection, allocator growth), i.e. a latency stall that warm-up does not cover.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.inputs import benchmark_pairs
from facefuse.detection import FaceDetector
from facefuse.face_mesh import FaceMesh
from facefuse.pipeline import SERVICE_DETECTOR_MAX_SIDE, FusionRequest, Preprocessor


def _stage_ms(prepared: list) -> dict[str, float]:
    """Each stage's time per request (a row's timings_ms hold the batch's stage time divided among its rows)."""
    stages: dict[str, float] = {}
    for row in prepared:
        for name, ms in getattr(row, "metadata", {}).get("timings_ms", {}).items():
            stages[name] = round(max(stages.get(name, 0.0), ms), 1)
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="3,5,11,16,23,32", help="requests per batch, in the order tried")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    pairs = benchmark_pairs(2 * max(sizes))
    detector = FaceDetector(device=args.device, max_side=SERVICE_DETECTOR_MAX_SIDE)
    preprocessor = Preprocessor(detector, FaceMesh(device=args.device))
    started = time.perf_counter()
    preprocessor.warm_up()
    print(f"[first-calls] warm-up {1000 * (time.perf_counter() - started):.0f} ms on {args.device}", flush=True)
    offset = 0
    for size in sizes:
        requests = [FusionRequest(*pairs[(offset + i) % len(pairs)], 100.0, 100.0, b"{}") for i in range(size)]
        offset += size
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            prepared = preprocessor.prepare_batch(requests)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            timings.append((1000 * (time.perf_counter() - started), _stage_ms(prepared)))
        (first, first_stages), (second, second_stages) = timings
        print(f"[first-calls] {size} requests: first {first:.0f} ms (per request by stage {first_stages}); "
              f"second {second:.0f} ms ({second_stages})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

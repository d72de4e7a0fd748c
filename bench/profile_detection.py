"""Where the detector's time goes: per-stage wall times (synchronised on CUDA) and a cProfile of detect_batch.

    python -m bench.profile_detection [--device cuda] [--batches 2,32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch

from bench.inputs import benchmark_pairs
from facefuse.detection import FaceDetector
from facefuse.imaging import decode_image
from facefuse.pipeline import SERVICE_DETECTOR_MAX_SIDE

_STAGES = ("_prepare", "_prepare_groups", "_pyramid", "_stage_pnet", "_stage_pnet_tensor", "_stage_rnet",
           "_stage_onet")


def _timed(detector: FaceDetector, totals: dict[str, float]) -> None:
    """Wrap the detector's stage methods (on the instance) so each call adds its synchronised wall time."""
    for name in _STAGES:
        method = getattr(detector, name, None)
        if method is None:
            continue

        def wrapper(*args, _method=method, _name=name, **kwargs):
            if detector.device.type == "cuda":
                torch.cuda.synchronize(detector.device)
            started = time.perf_counter()
            result = _method(*args, **kwargs)
            if detector.device.type == "cuda":
                torch.cuda.synchronize(detector.device)
            totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - started
            return result

        setattr(detector, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="2,32", help="images per detect_batch call, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.batches.split(",")]
    pairs = benchmark_pairs((max(sizes) + 1) // 2)
    images = [decode_image(data) for pair in pairs for data in pair]
    if args.device.startswith("cuda"):
        images = [torch.from_numpy(image).to(args.device) for image in images]
    detector = FaceDetector(device=args.device, max_side=SERVICE_DETECTOR_MAX_SIDE)
    for size in sizes:
        batch = images[:size]
        detector.detect_batch(batch)  # warm-up (kernels, allocator)
        totals: dict[str, float] = {}
        plain = FaceDetector.__new__(FaceDetector)
        plain.__dict__.update(detector.__dict__)
        _timed(plain, totals)
        started = time.perf_counter()
        for _ in range(args.repeats):
            faces = plain.detect_batch(batch)
        total = (time.perf_counter() - started) / args.repeats
        stages = {name: round(seconds / args.repeats * 1000, 1) for name, seconds in totals.items()}
        print(f"[profile] batch {size} on {args.device}: {total * 1000:.1f} ms per call, "
              f"{total * 1000 / size:.1f} ms per image; faces {sum(len(f) for f in faces)}; stages (ms per call) {stages}")
        profiler = cProfile.Profile()
        profiler.enable()
        detector.detect_batch(batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where preprocess's time goes: the detector's stages (synchronised wall times on CUDA) and a cProfile of
detect_batch, then (--preprocess) a cProfile of Preprocessor.prepare_batch over the same number of requests.

    python -m bench.profile_detection [--device cuda] [--batches 2,32] [--repeats 3] [--preprocess] [--no-cuda-graphs]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch

from bench.inputs import benchmark_pairs
from facefuse.detection import PROPOSAL_CHOICES, FaceDetector
from facefuse.imaging import decode_image
from facefuse.pipeline import SERVICE_DETECTOR_MAX_SIDE

_STAGES = ("_prepare", "_prepare_groups", "_pyramid", "_crop_pyramid", "_blazeface_proposals", "_stage_pnet",
           "_stage_pnet_tensor", "_stage_rnet", "_stage_onet")


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
    parser.add_argument("--preprocess", action="store_true", help="also profile whole preprocess batches")
    parser.add_argument("--proposals", choices=PROPOSAL_CHOICES, default="auto",
                        help="the detector's candidate faces (preprocess parameter detector_proposals)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run the nets eagerly on CUDA (preprocess parameter cuda_graphs = no)")
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.batches.split(",")]
    pairs = benchmark_pairs((max(sizes) + 1) // 2)
    images = [decode_image(data) for pair in pairs for data in pair]
    if args.device.startswith("cuda"):
        images = [torch.from_numpy(image).to(args.device) for image in images]
    detector = FaceDetector(device=args.device, max_side=SERVICE_DETECTOR_MAX_SIDE, proposals=args.proposals,
                            cuda_graphs=args.cuda_graphs)
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
              f"{total * 1000 / size:.1f} ms per image; faces {sum(len(f) for f in faces)}; "
              f"stages (ms per call) {stages}")
        profiler = cProfile.Profile()
        profiler.enable()
        detector.detect_batch(batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)
    if args.preprocess:
        _profile_preprocess(pairs, sizes, detector, args)
    return 0


def _profile_preprocess(pairs: list[tuple[bytes, bytes]], sizes: list[int], detector: FaceDetector,
                        args: argparse.Namespace) -> None:
    from facefuse.face_mesh import FaceMesh
    from facefuse.pipeline import FusionRequest, Preprocessor

    preprocessor = Preprocessor(detector, FaceMesh(device=args.device, cuda_graphs=args.cuda_graphs))
    preprocessor.warm_up()
    for size in sizes:
        requests = [FusionRequest(*pairs[i % len(pairs)], 100.0, 100.0, b"{}") for i in range((size + 1) // 2)]
        preprocessor.prepare_batch(requests)
        started = time.perf_counter()
        for _ in range(args.repeats):
            prepared = preprocessor.prepare_batch(requests)
        total = (time.perf_counter() - started) / args.repeats
        stages: dict[str, float] = {}
        for row in prepared:
            for name, ms in row.metadata["timings_ms"].items():
                stages[name] = stages.get(name, 0.0) + ms / len(prepared)
        print(f"[profile] preprocess, {len(requests)} requests on {args.device}: {total * 1000:.1f} ms per batch, "
              f"{total * 1000 / len(requests):.1f} ms per request; "
              f"timings_ms per request {({k: round(v, 2) for k, v in stages.items()})}")
        profiler = cProfile.Profile()
        profiler.enable()
        preprocessor.prepare_batch(requests)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    sys.exit(main())

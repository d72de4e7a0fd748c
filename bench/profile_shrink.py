"""The detector's working-image shrink on the GPU, per way of doing it: a batch of 1080p photos (uint8, channels
first) to the service's 640 x 360 working size (a whole factor of 3), GPU ms per batch (CUDA events, median).

    python -m bench.profile_shrink [--images 16] [--repeats 20]

"aa" is F.interpolate's antialiased bilinear on the float batch (any size); the others are block means, OpenCV's
INTER_AREA at a whole factor (detection.shrink_by_whole_factor picks one of them: "triton block means" on CUDA,
"avg_pool2d float" with FACEFUSE_TRITON_SHRINK=off or where the Triton kernel is unavailable).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from facefuse import triton_kernels


def _variants(factor: int) -> dict:
    def block_sum_float(pixels: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixels.shape
        return pixels.reshape(b, c, h // factor, factor, w // factor, factor).sum(dim=(3, 5), dtype=torch.float32)

    def two_integer_sums(pixels: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixels.shape
        columns = pixels.reshape(b, c, h, w // factor, factor).sum(dim=-1, dtype=torch.int32)
        return columns.reshape(b, c, h // factor, factor, w // factor).sum(dim=3).float()

    return {
        "aa": lambda p: F.interpolate(p.float(), size=(p.shape[2] // factor, p.shape[3] // factor), mode="bilinear",
                                      align_corners=False, antialias=True),
        "block sum, float cast": block_sum_float,
        "avg_pool2d float": lambda p: F.avg_pool2d(p.float(), factor),
        "avg_pool2d half": lambda p: F.avg_pool2d(p.half(), factor).float(),
        "two int32 sums": two_integer_sums,
        "triton block means": lambda p: triton_kernels.block_means(p, factor),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("[shrink] needs a CUDA device")
        return 2
    pixels = torch.randint(0, 256, (args.images, 3, 1080, 1920), dtype=torch.uint8, device="cuda")
    reference = F.avg_pool2d(pixels.double(), 3)
    for name, shrink in _variants(3).items():
        result = shrink(pixels)  # warm-up
        if name != "aa":
            error = float((result.double() / (9 if "sum" in name else 1) - reference).abs().max())
        else:
            error = float("nan")
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            shrink(pixels)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        print(f"[shrink] {args.images} x 1080p -> 640x360  {name:22s} {statistics.median(times):6.3f} ms  "
              f"max error vs block mean {error:.3g}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

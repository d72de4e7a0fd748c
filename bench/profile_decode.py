"""The photos' decode alone, as preprocess runs it (``decode_on_device``: one batched nvJPEG call on a GPU, Pillow on
a CPU): wall time and process CPU time per photo, so a run with and without an MPS daemon tells whether MPS costs
the decoder (session 19, H100: decode 0.67 ms per request alone, 1.34 under an MPS daemon) and whether that cost is
host work (CPU time grows: a software path) or waiting (only wall time grows).

    python -m bench.profile_decode [--device cuda] [--photos 16] [--repeats 20]

CUDA's default waits spin and count as CPU time; run with FACEFUSE_CUDA_SYNC=blocking (read at start, as the model
processes do) to count host work only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def decode_times(photos: list[bytes], device_name: str, repeats: int) -> tuple[float, float, float]:
    """(wall ms, process CPU ms, ms until the call returns) per photo, medians over ``repeats`` batched decodes of
    ``photos`` (one warm-up). The call can return before the GPU is done (nvImageCodec queues the decode on torch's
    stream; torchvision waits for it), and the host can queue the detector's work meanwhile."""
    import torch

    from facefuse.device_imaging import decode_on_device
    from facefuse.imaging import ImageLimits

    device = torch.device(device_name)
    items = [(data, "target") for data in photos]
    walls, cpus, returns = [], [], []
    for repeat in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        decoded = decode_on_device(items, ImageLimits(), device)
        returned = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if repeat:  # the first call sets up the decoder
            walls.append((time.perf_counter() - started) * 1000.0 / len(photos))
            cpus.append((time.process_time() - cpu_started) * 1000.0 / len(photos))
            returns.append((returned - started) * 1000.0 / len(photos))
        failed = [result for result in decoded if not isinstance(result, torch.Tensor)]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(photos)} photos did not decode: {failed[0]}")
    return statistics.median(walls), statistics.median(cpus), statistics.median(returns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda where there is a GPU, else cpu")
    parser.add_argument("--photos", type=int, default=16, help="1080p photos per batched call (16: a batch of 8)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    from facefuse.process_env import set_process_defaults

    set_process_defaults()  # thread caps and the CUDA wait policy, as in a model instance
    import torch

    from bench.inputs import benchmark_pairs

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    photos = [photo for pair in benchmark_pairs((args.photos + 1) // 2) for photo in pair][:args.photos]
    wall_ms, cpu_ms, returned_ms = decode_times(photos, device, args.repeats)
    from facefuse.device_imaging import describe_jpeg_decoding

    print(f"[decode] {args.photos} 1080p photos per call on {device} ({describe_jpeg_decoding(device)}): "
          f"{wall_ms:.3f} ms wall, {cpu_ms:.3f} ms CPU, call returned after {returned_ms:.3f} ms per photo "
          f"(median of {args.repeats})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

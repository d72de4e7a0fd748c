"""Host<->device copy costs of preprocess's and postprocess's image traffic (1080p RGB), one line each.

    python -m bench.profile_copies [--images 32] [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from bench.inputs import benchmark_pairs
from facefuse.device_imaging import image_to_device, to_host, warp_crops_of_images
from facefuse.hostmem import keep_freed_memory
from facefuse.imaging import decode_image


def _timed(label: str, function, repeats: int = 5) -> None:
    function()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        result = function()
        torch.cuda.synchronize()
        del result
    print(f"[copies] {label}: {(time.perf_counter() - started) / repeats * 1000:.1f} ms", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="as the Triton models do (facefuse.hostmem.keep_freed_memory)")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        print(f"[copies] keep_freed_memory: {keep_freed_memory()}")
    hosts = [decode_image(pair[1]) for pair in benchmark_pairs(args.images)]
    images = [torch.from_numpy(image).cuda() for image in hosts]
    matrices = np.tile(np.array([[0.5, 0.0, -300.0], [0.0, 0.5, -100.0]]), (2 * len(images), 1, 1))
    index = np.repeat(np.arange(len(images)), 2)
    _timed(f"warp {2 * len(images)} crops (gather)", lambda: warp_crops_of_images(images, index, matrices))
    _timed(f"{len(images)} images to host, one pageable copy", lambda: torch.cat([i.reshape(-1) for i in images]).cpu())
    _timed(f"{len(images)} images to host, pageable copy each", lambda: [i.cpu() for i in images])
    _timed(f"{len(images)} images to host, to_host (pinned)", lambda: to_host(images))
    keep = to_host(images)
    _timed(f"{len(images)} images to host, to_host while the last result lives", lambda: to_host(images))
    del keep
    _timed(f"{len(images)} images tobytes (host copy)", lambda: [h.tobytes() for h in hosts])
    _timed(f"{len(images)} images up, pageable", lambda: [torch.from_numpy(h).cuda() for h in hosts])
    _timed(f"{len(images)} images up, image_to_device (pinned staging)",
           lambda: [image_to_device(h, torch.device("cuda")) for h in hosts])
    return 0


if __name__ == "__main__":
    sys.exit(main())

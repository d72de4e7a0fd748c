"""Session 13's CUDA code paths against their references, for a GPU host without pytest (the device tool's): both
spline solvers against numpy (and raising on a singular system), the batched paste-back on CUDA against the CPU, the
marks of a batch against one at a time and against the CPU, the pooled shrink against block means.

    python -m bench.device_checks        # on a CUDA host (H100 output: bench/results/*_session13c_checks_profile.txt)

The tests hold the same checks on the CPU device (CI has no GPU); this runs them where the CUDA kernels are.
"""

from __future__ import annotations

import numpy as np
import torch

import facefuse.geometry as geometry
from facefuse import postprocess_torch
from facefuse.detection import shrink_by_whole_factor


def _worst_levels(first: list[torch.Tensor], second: list[torch.Tensor]) -> int:
    return max(int((a.cpu().int() - b.cpu().int()).abs().max()) for a, b in zip(first, second, strict=True))


def main() -> int:
    if not torch.cuda.is_available():
        print("[check] needs a CUDA device")
        return 2
    cuda = torch.device("cuda")
    rng = np.random.default_rng(5)
    centres, values = rng.uniform(10, 246, (8, 162, 2)), rng.uniform(0, 256, (8, 162, 4))
    reference = geometry.fit_tps_batch(centres, values)
    points = centres / geometry.CROP_SIZE
    for method in ("lu", "cholesky", "auto"):
        got = geometry._fit_tps_torch(points, values, geometry.TPS_REGULARISATION, "cuda", method)
        error = np.abs(got - reference).max() / np.abs(reference).max()
        print(f"[check] tps {method}: max relative difference from numpy {error:.1e}")
    collinear = np.stack([np.linspace(10, 246, 60), np.full(60, 128.0)], axis=1)[None] / geometry.CROP_SIZE
    for method in ("lu", "cholesky"):
        try:
            geometry._fit_tps_torch(collinear, values[:1, :60], geometry.TPS_REGULARISATION, "cuda", method)
            print(f"[check] tps {method} singular: NOT raised")
        except np.linalg.LinAlgError:
            print(f"[check] tps {method} singular: raised")

    def pasted(device: torch.device) -> list[torch.Tensor]:
        rows = postprocess_torch.benchmark_rows(4, device)
        return postprocess_torch.paste_back_rows_torch([(row.target, row.fused_crop, row.blend_mask,
                                                         row.target_matrix) for row in rows])

    on_gpu = pasted(cuda)
    print(f"[check] paste rows cuda vs cpu: worst {_worst_levels(on_gpu, pasted(torch.device('cpu')))} grey levels")
    images = [image.clone() for image in on_gpu]
    images[1] = images[1].flip(0).contiguous()
    ids = [11, 12, 13, 14]
    together = postprocess_torch.embed_watermarks_torch(images, ids)
    alone = [postprocess_torch.embed_watermarks_torch([image], [mark])[0] for image, mark in zip(images, ids)]
    print(f"[check] watermarks together == alone on cuda: {all(map(torch.equal, together, alone))}")
    on_cpu = postprocess_torch.embed_watermarks_torch([image.cpu() for image in images], ids)
    print(f"[check] watermarks cuda vs cpu: worst {_worst_levels(together, on_cpu)} grey levels")
    pixels = torch.randint(0, 256, (4, 3, 1080, 1920), dtype=torch.uint8, device=cuda)
    error = float((shrink_by_whole_factor(pixels, 3).double()
                   - pixels.double().reshape(4, 3, 360, 3, 640, 3).mean(dim=(3, 5))).abs().max())
    print(f"[check] whole-factor shrink on cuda: max difference from block means {error:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

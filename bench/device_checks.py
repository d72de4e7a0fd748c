"""The CUDA code paths against their references, for a GPU host without pytest (the device tool's): both spline
solvers against numpy (and raising on a singular system), the batched paste-back on CUDA against the CPU, the marks of
a batch against one at a time and against the CPU, the pooled shrink against block means, and the fused watermark
kernels (facefuse.fused_kernels, facefuse.triton_kernels) against the torch path on CUDA, bit for bit.

    python -m bench.device_checks        # on a CUDA host (H100 output: bench/results/*_session13c_checks_profile.txt)

The tests hold the same checks on the CPU device (CI has no GPU); this runs them where the CUDA kernels are.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

import facefuse.geometry as geometry
from facefuse import fused_kernels, postprocess_torch, triton_kernels
from facefuse.detection import shrink_by_whole_factor
from facefuse.device_imaging import warp_crops_of_images


def _worst_levels(first: list[torch.Tensor], second: list[torch.Tensor]) -> int:
    return max(int((a.cpu().int() - b.cpu().int()).abs().max()) for a, b in zip(first, second, strict=True))


def _torch_path(function, *args, setting: str = "off"):
    """``function(*args)`` with the fused kernels switched off (FACEFUSE_FUSED_KERNELS=off), or another setting."""
    before = os.environ.get(fused_kernels.ENVIRONMENT_VARIABLE)
    os.environ[fused_kernels.ENVIRONMENT_VARIABLE] = setting
    try:
        return function(*args)
    finally:
        if before is None:
            del os.environ[fused_kernels.ENVIRONMENT_VARIABLE]
        else:
            os.environ[fused_kernels.ENVIRONMENT_VARIABLE] = before


def check_fused_kernels(images: list[torch.Tensor], device: torch.device) -> None:
    launch = fused_kernels.launcher(device)
    if launch is None:
        return
    pt = postprocess_torch
    batch = torch.stack(images)
    luma = pt._luma(batch)
    same_luma = torch.equal(luma.to(torch.int32), _torch_path(pt._luma, batch))
    same_detail = torch.equal(pt._amplitude_detail(luma), _torch_path(pt._amplitude_detail, luma.to(torch.int32)))
    samples = pt._area_resize(luma, luma.shape[-2] // 2, luma.shape[-1] // 2).to(torch.float32)
    same_high = torch.equal(pt._high_pass(samples, 2.0), _torch_path(pt._high_pass, samples, 2.0))
    print(f"[check] fused == torch path on cuda: luma {same_luma}, detail {same_detail}, high-pass {same_high}")
    marked_once = pt.embed_watermarks_torch(images[:1], [99])[0]  # the re-marking check's path too
    again = [marked_once, *images[1:]]
    ids = [7, 8, 9, 10][: len(again)]
    fused_marks = pt.embed_watermarks_torch(again, ids)
    torch_marks = _torch_path(pt.embed_watermarks_torch, again, ids)
    print(f"[check] fused == torch path on cuda: watermarks {all(map(torch.equal, fused_marks, torch_marks))}")
    jiterator_marks = _torch_path(pt.embed_watermarks_torch, again, ids, setting="jiterator")
    print(f"[check] Triton mark kernel in use {triton_kernels.use_triton_mark(device)}; watermarks == the jiterator "
          f"kernel's {all(map(torch.equal, fused_marks, jiterator_marks))}")
    pixels = torch.randint(0, 256, (4, 3, 1080, 1920), dtype=torch.uint8, device=device)
    print(f"[check] Triton block means == avg_pool2d on cuda: "
          f"{torch.equal(triton_kernels.block_means(pixels, 3), torch.nn.functional.avg_pool2d(pixels.float(), 3))}")
    reduction = pt.AMPLITUDE_REDUCTION
    whole = luma[..., : luma.shape[-2] // reduction * reduction, : luma.shape[-1] // reduction * reduction]
    detail = triton_kernels.watermark_detail(whole, pt.detail_taps(), reduction)
    print(f"[check] Triton texture map == torch path on cuda: "
          f"{torch.equal(detail, pt.detail_map_reference(whole.to(torch.int32)))}")
    luma = torch.randint(0, 256, (8, 1080, 1920), device=device).to(torch.float32)  # the fused luma's dtype
    timings = {}
    for name, run in (("triton", lambda: triton_kernels.watermark_detail(luma, pt.detail_taps(), reduction)),
                      ("jiterator", lambda: pt._detail_map(luma, launch))):
        run()
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(50):
            run()
        torch.cuda.synchronize(device)
        timings[name] = 1e3 * (time.perf_counter() - started) / 50
    print(f"[check] texture map of 8 rows 1080p: Triton {timings['triton']:.3f} ms, "
          f"jiterator kernels {timings['jiterator']:.3f} ms (wall per call, queue kept full)")


def main() -> int:
    if not torch.cuda.is_available():
        print("[check] needs a CUDA device")
        return 2
    cuda = torch.device("cuda")
    started = time.perf_counter()  # first: the self-check compiles the fused kernels (or finds them in the disk cache)
    available = fused_kernels.launcher(cuda) is not None
    print(f"[check] fused kernels: {'available' if available else 'UNAVAILABLE'} "
          f"(self-check incl. compiling {1e3 * (time.perf_counter() - started):.0f} ms)")
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
    check_fused_kernels(images, cuda)
    planes = torch.randint(0, 256, (2, 3, 1080, 1920), dtype=torch.uint8, device=cuda)  # like nvJPEG's output
    views = [plane.permute(1, 2, 0) for plane in planes]
    matrices = np.array([[[0.8, 0.1, -600.0], [-0.1, 0.8, -300.0]], [[1.2, 0.0, -50.0], [0.0, 1.2, -900.0]]] * 2)
    index = np.array([0, 1, 1, 0])
    in_place = warp_crops_of_images(views, index, matrices)
    packed = warp_crops_of_images([view.contiguous() for view in views], index, matrices)
    print(f"[check] crops from (3,H,W) planes in place == from packed copies on cuda: {torch.equal(in_place, packed)}")
    pixels = torch.randint(0, 256, (4, 3, 1080, 1920), dtype=torch.uint8, device=cuda)
    error = float((shrink_by_whole_factor(pixels, 3).double()
                   - pixels.double().reshape(4, 3, 360, 3, 640, 3).mean(dim=(3, 5))).abs().max())
    print(f"[check] whole-factor shrink on cuda: max difference from block means {error:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

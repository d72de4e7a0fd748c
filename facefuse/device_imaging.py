"""Images as tensors on the detector's device: batched decoding (nvJPEG on CUDA) and the aligned-crop warp.

The GPU path of preprocess: JPEGs are decoded on the GPU in one batched call (torchvision's nvJPEG binding, where
torchvision is installed), so a 1080p photo never exists as a host array in preprocess. Every limit is still checked
from the header with Pillow first (facefuse.imaging), EXIF orientation is applied on the device, and anything nvJPEG
cannot take (PNG, WebP, BMP, CMYK JPEGs, corrupt data) goes through ``decode_image`` so that errors and results are
the host path's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from facefuse.alignment import CROP_SIZE, invert_affine
from facefuse.errors import FusionError
from facefuse.imaging import ImageLimits, _check_limits, _open_header, _orientation, decode_image


@functools.lru_cache(maxsize=1)
def nvjpeg_decoder() -> Callable | None:
    """torchvision.io.decode_jpeg, or None where torchvision is not importable (it is not installed beside the CPU
    torch of the local environment; GPU hosts have it)."""
    try:
        from torchvision.io import decode_jpeg
    except Exception:  # noqa: BLE001 - any import failure means: no GPU decoding
        return None
    return decode_jpeg


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Bring an HxWx3 tensor upright for an EXIF orientation 1-8 (the transposes Pillow's exif_transpose applies)."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(0, 1)
    flips = {2: (1,), 3: (0, 1), 4: (0,), 5: (), 6: (1,), 7: (0, 1), 8: (0,)}.get(orientation, ())
    return image.flip(flips) if flips else image


def _jpeg_header(data: bytes, role: str, limits: ImageLimits) -> int | None:
    """EXIF orientation of a JPEG that nvJPEG can decode (after the limit checks), None for anything else."""
    if len(data) > limits.max_bytes:
        return None  # decode_image raises the IMAGE_TOO_LARGE error with its message
    im, fmt = _open_header(data, role, limits)
    try:
        _check_limits(*im.size, limits, role)
        if fmt != "JPEG" or im.mode not in ("RGB", "L"):  # CMYK / YCCK JPEGs: Pillow converts them properly
            return None
        return _orientation(im)
    finally:
        im.close()


def decode_on_device(items: Sequence[tuple[bytes, str]], limits: ImageLimits,
                     device: torch.device) -> list[torch.Tensor | FusionError]:
    """Decode (bytes, role) pairs to upright HxWx3 uint8 tensors on ``device``; a failure is that item's
    FusionError (the same code and message as ``decode_image``)."""
    results: list[torch.Tensor | FusionError | None] = [None] * len(items)
    decoder = nvjpeg_decoder() if device.type == "cuda" else None
    on_gpu: list[tuple[int, int]] = []  # (item, orientation)
    for position, (data, role) in enumerate(items):
        try:
            orientation = _jpeg_header(data, role, limits) if decoder is not None else None
        except FusionError as error:
            results[position] = error
            continue
        if orientation is not None:
            on_gpu.append((position, orientation))
    if on_gpu:
        from torchvision.io import ImageReadMode

        encoded = [torch.frombuffer(bytearray(items[position][0]), dtype=torch.uint8) for position, _ in on_gpu]
        try:
            decoded = decoder(encoded, mode=ImageReadMode.RGB, device=device)  # one batched nvJPEG call
        except RuntimeError:
            decoded = [None] * len(on_gpu)  # one bad file fails the batch: the host path sorts them out
        for (position, orientation), chw in zip(on_gpu, decoded):
            if chw is not None:
                results[position] = orient(chw.permute(1, 2, 0), orientation)
    for position, (data, role) in enumerate(items):
        if results[position] is None:
            try:
                results[position] = torch.from_numpy(decode_image(data, limits, role=role)).to(device)
            except FusionError as error:
                results[position] = error
    return results  # type: ignore[return-value]


def warp_to_crops(image: torch.Tensor, matrices: np.ndarray, crop_size: int = CROP_SIZE) -> torch.Tensor:
    """``alignment.warp_to_crop`` for several faces of one HxWx3 uint8 tensor: (N,2,3) image->crop matrices ->
    (N,S,S,3) uint8 crops on the image's device (bilinear, mirrored border; matches OpenCV to ~1 grey level)."""
    height, width = image.shape[:2]
    device = image.device
    inverse = torch.as_tensor(np.stack([invert_affine(matrix) for matrix in matrices]), device=device)
    centres = torch.arange(crop_size, device=device, dtype=torch.float64)
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(-1, 3)  # crop pixels (x, y, 1)
    source = points @ inverse.transpose(1, 2)  # (N, S*S, 2) image pixel coordinates
    # OpenCV's BORDER_REFLECT101 mirrors about the first and last pixel centres; for bilinear sampling that equals
    # folding the coordinate into [0, size - 1] (period 2 * (size - 1)) and sampling there.
    last = torch.tensor([max(width - 1, 1), max(height - 1, 1)], device=device, dtype=torch.float64)
    folded = last - (torch.remainder(source, 2.0 * last) - last).abs()
    grid = (folded * (2.0 / last) - 1.0).reshape(len(matrices), crop_size, crop_size, 2).float()
    planes = image.permute(2, 0, 1)[None].float().expand(len(matrices), -1, -1, -1)
    crops = F.grid_sample(planes, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return crops.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


__all__ = ["decode_on_device", "nvjpeg_decoder", "orient", "warp_to_crops"]

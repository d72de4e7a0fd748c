"""The postprocess hot path (paste back -> label -> watermark -> encode) on a torch device.

Same results as ``pipeline.paste_back``, ``watermark.embed_watermark`` and ``pipeline.finish``, but every step that
touches each pixel of the full-size image runs on the tensors' device (CUDA on a GPU host), so the host only does
work on small arrays: the 2x3 matrix, the per-axis sampling tables, the 1/8-resolution amplitude mask, the folded
tile of the re-marking check and the 33-chip watermark tile.

Parity with the OpenCV code it replaces (opencv-python-headless 4.10, the pinned version; measured by
tests/test_postprocess_torch.py, which allows 1 grey level on 0.1% of values):

* the luma, the 5x5 Gaussian of the texture mask and the INTER_AREA downsamplings are OpenCV's fixed-point /
  area arithmetic reproduced exactly (bit-identical, on any device);
* ``paste_back_torch`` samples with ``grid_sample`` at the positions ``cv2.warpAffine`` uses, i.e. quantised to
  1/32 px (INTER_BITS = 5) through its 10-bit fixed-point coordinate arithmetic, with the same bilinear weights,
  so only a different float summation order (FMA, another CPU, CUDA) could flip a rounding: bit-identical in every
  case measured on the CPU (without the 1/32 px quantisation edges differ by up to 3 grey levels);
* the watermark's rounding, saturating add is cv2.add's (it rounds the float delta half to even, then adds); the
  full-resolution amplitude follows cv2.resize INTER_LINEAR's tables but OpenCV's float weights differ in their
  last bits (<= 1.2e-5 grey levels apart), so a rounding flips by 1 grey level on about one pixel in a million.

On CUDA the watermark's full-resolution steps (luma, the texture measure's blur, the re-marking check's high-pass,
the mark's interpolation, rounding and add) run as fused elementwise kernels (``facefuse.fused_kernels``), with the
same roundings in the same order as the torch code here: bit-identical to it, so the parity above holds for both.
The mark's add and the texture map (blur, difference, area mean) each run as one OpenAI Triton kernel where Triton
compiles (``facefuse.triton_kernels``: also bit-identical); ``FACEFUSE_FUSED_KERNELS=jiterator`` keeps them on the
jiterator kernels.

``finish_torch`` encodes JPEG with nvJPEG (``torchvision.io.encode_jpeg``) when the image is on a CUDA device and
torchvision is importable; PNG and WebP, and JPEG everywhere else, go through ``imaging.encode_image`` on the host.

On a CPU-only host keep using pipeline.finish: torch's CPU kernels make one memory pass per elementwise operation
where OpenCV fuses them, so this path is slower there (``benchmark()`` measures both). The torch CPU path exists
for the tests and as a fallback.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from facefuse import fused_kernels, triton_kernels
from facefuse.alignment import invert_affine
from facefuse.device_imaging import (
    cv2_grid_of_tables,
    cv2_inverse,
    cv2_warp_tables,
    image_to_device,
    to_device,
    to_host,
)
from facefuse.imaging import encode_image, insert_jpeg_xmp
from facefuse.label import DEFAULT_LABEL, DEFAULT_POSITION, label_box, label_layout
from facefuse.options import FusionOptions
from facefuse.pipeline import SOFTWARE, crop_footprint
from facefuse.provenance import build_xmp
from facefuse.watermark import (
    _MIN_SIDE,
    _PILOT_Z,
    AMPLITUDE_REDUCTION,
    DETAIL_KSIZE,
    DETAIL_SIGMA,
    EARLIER_MARK_SAMPLES,
    EARLIER_MARK_SIGMA,
    _amplitude_from_detail,
    _capped,
    _check_mark_arguments,
    _earlier_mark_of_fold,
    _mark_tile,
    _period,
    _pilot_z,
    parse_watermark_id,
)

__all__ = ["FinishRow", "benchmark", "embed_watermark_torch", "embed_watermarks_torch", "encode_jpeg_torch",
           "encode_jpegs_torch", "finish_torch", "finish_torch_batch", "jpeg_encoder_for", "paste_back_rows_torch",
           "paste_back_torch"]

# cv2.cvtColor(RGB2GRAY) on 8-bit: BT.601 weights in 15-bit fixed point, rounded (exact over all 2^24 colours).
_GRAY_WEIGHTS = (9798, 19235, 3735)
_GRAY_SHIFT = 15
# OpenCV's 8-bit GaussianBlur: kernel in 8-bit fixed point, both passes exact in integers, one rounding at the end.
_BLUR_FRACTION_BITS = 8
# Same-size images whose watermark analysis runs as one batch: bounds its int32 temporaries (~0.5 GB at 1080p).
_IMAGES_PER_PASS = 8
# Pixels per band of the watermark add (over the images added together): bounds the float temporaries (~16 M px,
# ~200 MB) whatever the image size; 8 1080p images go in one band.
_BAND_PIXELS = 1 << 24


def _elapsed_ms(started: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA kernels are asynchronous: time the work, not its launch
    return round((time.perf_counter() - started) * 1000.0, 2)


def _check_image(rgb: torch.Tensor) -> None:
    if not isinstance(rgb, torch.Tensor) or rgb.dtype != torch.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        kind = f"{rgb.dtype} {tuple(rgb.shape)}" if isinstance(rgb, torch.Tensor) else type(rgb).__name__
        raise ValueError(f"expected an HxWx3 uint8 torch tensor, got {kind}")


# ---------------------------------------------------------------------------------------------------------------
# Paste back.


def paste_back_torch(target: torch.Tensor, fused_crop: torch.Tensor | np.ndarray, blend_mask: torch.Tensor | np.ndarray,
                     target_matrix: np.ndarray) -> torch.Tensor:
    """Warp the fused crop (3,S,S in [0,1]) and its mask (1,S,S) back into the target (H,W,3 uint8) and blend.

    The same result as pipeline.paste_back (cv2.warpAffine INTER_LINEAR, BORDER_REPLICATE for the crop, constant 0
    for the mask) within 1 grey level, on target's device; only the bounding box of the crop's footprint is warped.
    ``target_matrix`` (2x3) maps image pixels to crop pixels. Crop and mask may be numpy arrays or tensors on any
    device; they are moved to target's. Returns a new tensor; ``target`` is not modified.
    """
    result = paste_back_rows_torch([(target, fused_crop, blend_mask, target_matrix)])[0]
    if isinstance(result, Exception):
        raise result
    return result


_PasteRow = tuple[torch.Tensor, torch.Tensor | np.ndarray, torch.Tensor | np.ndarray, np.ndarray]


def paste_back_rows_torch(rows: Sequence[_PasteRow]) -> list[torch.Tensor | Exception]:
    """``paste_back_torch`` of several (target, fused crop, blend mask, target matrix) rows, a row's failure in its
    place: every row's warp tables (host arithmetic) go up in one copy per device, so the host waits for the GPU
    once per batch, not once per row behind the pastes already queued."""
    results: list[torch.Tensor | Exception | None] = [None] * len(rows)
    planned = []  # (position, crop, mask, box, tables)
    for position, (target, fused_crop, blend_mask, target_matrix) in enumerate(rows):
        try:
            _check_image(target)
            device = target.device
            height, width = target.shape[:2]
            crop = torch.as_tensor(fused_crop, device=device).to(torch.float32)
            size = int(crop.shape[-1])
            if crop.shape != (3, size, size):
                raise ValueError(f"expected the fused crop as (3, S, S), got {tuple(crop.shape)}")
            mask = torch.as_tensor(blend_mask, device=device).to(torch.float32).reshape(1, 1, size, size)
            box = crop_footprint(target_matrix, size, width, height)
            if box is None:
                results[position] = target.clone()
                continue
            x1, y1, x2, y2 = box
            shifted = invert_affine(target_matrix)  # crop -> image: the forward matrix paste_back gives warpAffine
            shifted[:, 2] -= (x1, y1)
            planned.append((position, crop, mask, box, cv2_warp_tables(cv2_inverse(shifted), x2 - x1, y2 - y1)))
        except Exception as error:  # noqa: BLE001 - the row's own failure, reported in its place
            results[position] = error
    by_device: dict[torch.device, list[int]] = {}
    for slot, (position, *_) in enumerate(planned):
        by_device.setdefault(rows[position][0].device, []).append(slot)
    for device, slots in by_device.items():
        uploaded = to_device([table for slot in slots for table in planned[slot][4]], device)
        for index, slot in enumerate(slots):
            position, crop, mask, box, _ = planned[slot]
            try:
                grid = cv2_grid_of_tables(uploaded[2 * index], uploaded[2 * index + 1], int(crop.shape[-1]))
                results[position] = _blend_warped(rows[position][0], crop, mask, box, grid)
            except Exception as error:  # noqa: BLE001
                results[position] = error
    return results  # type: ignore[return-value]


def _blend_warped(target: torch.Tensor, crop: torch.Tensor, mask: torch.Tensor, box: tuple[int, int, int, int],
                  grid: torch.Tensor) -> torch.Tensor:
    """A copy of target with the crop (3,S,S float in [0,1]) and its mask (1,1,S,S) sampled through ``grid`` into
    ``box`` and blended there."""
    x1, y1, x2, y2 = box
    pixels = torch.clamp(crop * 255.0, 0.0, 255.0)[None]  # alignment.tensor_to_crop, channels first
    fused = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    weight = F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    fused, weight = fused.permute(1, 2, 0), torch.clamp(weight, 0.0, 1.0).permute(1, 2, 0)
    out = target.clone()
    region = out[y1:y2, x1:x2].to(torch.float32)
    out[y1:y2, x1:x2] = torch.clamp(region + weight * (fused - region) + 0.5, 0.0, 255.0).to(torch.uint8)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Watermark: OpenCV's arithmetic for the full-resolution steps, on the device. Luma, blurs, area resizes and the fold
# take (..., H, W) tensors: the images of one size in a batch go through them together (one launch per step).


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    """cv2.cvtColor(rgb, COLOR_RGB2GRAY) (..., H, W), bit-exact: int32, or float32 from the fused kernel."""
    launch = fused_kernels.launcher(rgb.device)
    if launch is not None:
        return launch(fused_kernels.luma_kernel(_GRAY_WEIGHTS, _GRAY_SHIFT),
                      [rgb[..., 0], rgb[..., 1], rgb[..., 2], fused_kernels.one(rgb.device)])
    red, green, blue = (rgb[..., channel].to(torch.int32) for channel in range(3))
    weight_r, weight_g, weight_b = _GRAY_WEIGHTS
    return (red * weight_r + green * weight_g + blue * weight_b + (1 << (_GRAY_SHIFT - 1))) >> _GRAY_SHIFT


@functools.lru_cache(maxsize=8)
def _fixed_point_gaussian(ksize: int, sigma: float) -> tuple[int, ...]:
    """OpenCV's 8-bit Gaussian kernel: the normalised kernel in _BLUR_FRACTION_BITS fixed point, rounded with error
    diffusion from the ends towards the centre, the centre taking what makes the sum exactly one."""
    kernel = cv2.getGaussianKernel(ksize, sigma, cv2.CV_64F).ravel().tolist()
    one = 1 << _BLUR_FRACTION_BITS
    half = ksize // 2
    taps, error = [0] * ksize, 0.0
    for index in range(half):
        value = kernel[index] * one + error
        taps[index] = taps[ksize - 1 - index] = int(np.rint(value))
        error = value - taps[index]
    taps[half] = one - 2 * sum(taps[:half])
    return tuple(taps)


def _pad_reflect101(image: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """``image`` padded by ``radius`` along ``dim`` with BORDER_REFLECT_101 (cv2's default border: ...cb|abc|ba...)."""
    length = image.shape[dim]
    if length <= radius:  # tiny images: an index table handles reflections of reflections
        index = np.abs(np.arange(-radius, length + radius)) % max(1, 2 * (length - 1))
        index = np.where(index > length - 1, 2 * (length - 1) - index, index)
        return image.index_select(dim, torch.from_numpy(index).to(image.device))
    before = image.narrow(dim, 1, radius).flip(dim)
    after = image.narrow(dim, length - 1 - radius, radius).flip(dim)
    return torch.cat([before, image, after], dim=dim)


def _gaussian_blur_u8(image: torch.Tensor, ksize: int, sigma: float) -> torch.Tensor:
    """cv2.GaussianBlur(uint8 image, (ksize, ksize), sigma), bit-exact, for an int32 tensor of 0..255 values.

    Integer arithmetic throughout (no convolution kernels: on CUDA those could run in TF32): horizontal pass with
    the 8-bit fixed-point taps (symmetric: pairs added first), vertical pass, then round half up from 16 fraction
    bits.
    """
    taps = _fixed_point_gaussian(ksize, sigma)
    bits = 2 * _BLUR_FRACTION_BITS
    return (_symmetric_pass(_symmetric_pass(image.to(torch.int32), taps, -1), taps, -2) + (1 << (bits - 1))) >> bits


def _padded_planes(image: torch.Tensor, radius: int) -> torch.Tensor:
    """(..., H, W) -> (N, H + 2 radius, W + 2 radius) float32 with BORDER_REFLECT_101 (torch's "reflect") on both
    axes in one pass: a row filter over the padded rows then a column filter equals cv2's separable filter."""
    planes = image.to(torch.float32).reshape(-1, 1, *image.shape[-2:])
    return F.pad(planes, (radius, radius, radius, radius), mode="reflect")[:, 0]


def _shifted(padded: torch.Tensor, dim: int, length: int, offsets: Sequence[int]) -> list[torch.Tensor]:
    """Views of ``padded`` starting ``offset`` samples in along ``dim``, ``length`` long: a filter's taps as inputs
    of an elementwise kernel."""
    return [padded.narrow(dim, offset, length) for offset in offsets]


def _fused_detail(luma: torch.Tensor, launch: fused_kernels.Launcher) -> torch.Tensor:
    """|luma - GaussianBlur(luma, 5x5, 1.2)| as float32 exact integers: _gaussian_blur_u8's arithmetic in two fused
    kernels (row pass; column pass + rounding + difference)."""
    taps = detail_taps()
    height, width = luma.shape[-2:]
    padded = _padded_planes(luma, DETAIL_KSIZE // 2)
    rows = launch(fused_kernels.blur_u8_row_kernel(taps), _shifted(padded, -1, width, range(DETAIL_KSIZE)))
    centre = luma.to(torch.float32).reshape(-1, height, width)
    detail = launch(fused_kernels.column_detail_kernel(taps, _BLUR_FRACTION_BITS),
                    [*_shifted(rows, -2, height, range(DETAIL_KSIZE)), centre])
    return detail.reshape(luma.shape)


def _fused_float_pass(padded: torch.Tensor, taps: tuple[float, ...], dim: int, length: int,
                      launch: fused_kernels.Launcher, values: torch.Tensor | None = None) -> torch.Tensor:
    """_symmetric_pass over already padded values (``length`` results along ``dim``) in fused kernels; with
    ``values``, values minus the filtered values."""
    ksize = len(taps)
    radius = ksize // 2
    partial = None
    for kernel, pairs in fused_kernels.float_pass_kernels(taps, values is not None):
        inputs = [padded.narrow(dim, radius, length) if partial is None else partial]
        for offset in pairs:
            inputs += _shifted(padded, dim, length, (offset, ksize - 1 - offset))
        if values is not None and kernel.params[-1] == "values":
            inputs.append(values)
        partial = launch(kernel, inputs)
    return partial


def _symmetric_pass(values: torch.Tensor, taps: tuple[float, ...] | tuple[int, ...], dim: int) -> torch.Tensor:
    """One pass of a symmetric (odd-length) filter along ``dim`` with BORDER_REFLECT_101, as OpenCV sums it: the
    centre tap, then each pair of mirrored samples added first and scaled by their shared tap."""
    ksize = len(taps)
    radius, length = ksize // 2, values.shape[dim]
    padded = _pad_reflect101(values, radius, dim)
    total = taps[radius] * padded.narrow(dim, radius, length)
    for offset in range(radius):
        total += taps[offset] * (padded.narrow(dim, offset, length) + padded.narrow(dim, ksize - 1 - offset, length))
    return total


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for array in arrays:
        array.flags.writeable = False
    return arrays


@functools.lru_cache(maxsize=64)
def _area_taps(source: int, target: int) -> tuple[np.ndarray, ...]:
    """cv2's INTER_AREA table for one axis (computeResizeAreaTab): (target, k) source indices and float32 weights.
    Cached: image sizes repeat, and on a GPU host this Python loop would cost more than the resize itself."""
    scale = 1.0 / (target / source)
    taps: list[list[tuple[int, float]]] = []
    for index in range(target):
        start = index * scale
        end = start + scale
        cell = min(scale, source - start)
        first, last = math.ceil(start), math.floor(end)
        last = min(last, source - 1)
        first = min(first, last)
        row = []
        if first - start > 1e-3:
            row.append((first - 1, (first - start) / cell))
        row.extend((position, 1.0 / cell) for position in range(first, last))
        if end - last > 1e-3:
            row.append((last, min(min(end - last, 1.0), cell) / cell))
        taps.append(row)
    width = max(len(row) for row in taps)
    indices = np.array([[row[min(k, len(row) - 1)][0] for k in range(width)] for row in taps], dtype=np.int64)
    weights = np.array([[row[k][1] if k < len(row) else 0.0 for k in range(width)] for row in taps], dtype=np.float32)
    return _read_only(indices, weights)


def _area_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """cv2.resize(uint8 image, (width, height), interpolation=INTER_AREA) for downscaling, as int32 values 0..255.

    Integer factors take OpenCV's fast path: the block sum times 1/area, rounded half to even, except 2x2, which
    its SIMD code rounds half up. Other factors: the separable float32 area table, summed in OpenCV's order.
    """
    *lead, source_height, source_width = image.shape
    scale_x, scale_y = 1.0 / (width / source_width), 1.0 / (height / source_height)  # cv2's own expression
    fx, fy = round(scale_x), round(scale_y)
    if abs(scale_x - fx) < np.finfo(np.float64).eps and abs(scale_y - fy) < np.finfo(np.float64).eps:
        # Block sums by pooling in float32: exact (integers below 2**24), one pass, any device.
        region = image.to(torch.float32)[..., : height * fy, : width * fx]
        blocks = F.avg_pool2d(region.reshape(-1, 1, height * fy, width * fx), (fy, fx), divisor_override=1)
        blocks = blocks.reshape(*lead, height, width)
        if fx == 2 and fy == 2:
            return torch.floor((blocks + 2) * 0.25).to(torch.int32)  # (sum + 2) >> 2
        return torch.round(blocks * np.float32(1.0 / (fx * fy))).clamp(0, 255).to(torch.int32)
    values = image.to(torch.float32)
    for dim, (source, target) in ((-1, (source_width, width)), (-2, (source_height, height))):
        index_t, weight_t = _taps_on(_area_taps, source, target, image.device)
        total = None
        for k in range(index_t.shape[1]):
            picked = values.index_select(dim, index_t[:, k])
            term = picked * (weight_t[:, k] if dim == -1 else weight_t[:, k, None])
            total = term if total is None else total + term
        values = total
    return torch.round(values).clamp(0, 255).to(torch.int32)


@functools.lru_cache(maxsize=64)
def _linear_taps(source: int, target: int) -> tuple[np.ndarray, ...]:
    """cv2.resize INTER_LINEAR's table for one axis (float images): (index0, index1, weight0, weight1), float32
    weights, pixel centres aligned ((d + 0.5) * scale - 0.5), positions outside clamped to the edge sample."""
    scale = 1.0 / (target / source)
    position = ((np.arange(target) + 0.5) * scale - 0.5).astype(np.float32)
    index = np.floor(position).astype(np.int64)
    fraction = position - index.astype(np.float32)
    low, high = index < 0, index >= source - 1
    fraction[low], index[low] = 0.0, 0
    fraction[high], index[high] = 0.0, source - 1
    return _read_only(index, np.minimum(index + 1, source - 1), np.float32(1.0) - fraction, fraction)


@functools.lru_cache(maxsize=128)
def _taps_on(taps: Callable[[int, int], tuple[np.ndarray, ...]], source: int, target: int,
             device: torch.device) -> tuple[torch.Tensor, ...]:
    """A taps table (_linear_taps, _area_taps) as tensors on ``device``, kept: uploading them for every image made
    the host wait for the GPU's queue (8 waits per marked image)."""
    return tuple(to_device(list(taps(source, target)), device))


def detail_taps() -> tuple[int, ...]:
    """The texture measure's blur: cv2's 8-bit fixed-point taps of GaussianBlur(5x5, 1.2)."""
    return _fixed_point_gaussian(DETAIL_KSIZE, DETAIL_SIGMA)


def detail_map_reference(luma: torch.Tensor) -> torch.Tensor:
    """The texture map by the plain torch path (integers, any device): what every faster path must equal."""
    return _detail_map(luma, None)


def _detail_map(luma: torch.Tensor, launch: fused_kernels.Launcher | None) -> torch.Tensor:
    height, width = luma.shape[-2:]
    if launch is not None and min(height, width) > DETAIL_KSIZE // 2:
        detail = _fused_detail(luma, launch)
    else:
        detail = torch.abs(luma - _gaussian_blur_u8(luma, DETAIL_KSIZE, DETAIL_SIGMA))
    return _area_resize(detail, max(1, height // AMPLITUDE_REDUCTION), max(1, width // AMPLITUDE_REDUCTION)).to(
        torch.uint8)


def _amplitude_detail(luma: torch.Tensor) -> torch.Tensor:
    """The device half of watermark._amplitude: the 1/8-resolution texture map (uint8, bit-exact); its small blur
    and clipping (watermark._amplitude_from_detail) run on the host. Sides that AMPLITUDE_REDUCTION divides can take
    the one-pass Triton kernel (blur, difference and area mean in registers)."""
    height, width = luma.shape[-2:]
    if (luma.dim() == 3 and height % AMPLITUDE_REDUCTION == 0 and width % AMPLITUDE_REDUCTION == 0
            and triton_kernels.use_triton_detail(luma.device)):
        return triton_kernels.watermark_detail(luma, detail_taps(), AMPLITUDE_REDUCTION)
    return _detail_map(luma, fused_kernels.launcher(luma.device))


def _earlier_mark_samples(luma: torch.Tensor, period: int) -> torch.Tensor | None:
    """The area resampling of watermark._earlier_mark to 2 samples per chip (bit-exact). None when no tile fits."""
    tiles_y, tiles_x = luma.shape[-2] // period, luma.shape[-1] // period
    if tiles_y * tiles_x == 0:
        return None
    region = luma[..., : tiles_y * period, : tiles_x * period]
    size = EARLIER_MARK_SAMPLES
    return _area_resize(region, tiles_y * size, tiles_x * size)


@functools.lru_cache(maxsize=8)
def _float_gaussian(sigma: float) -> tuple[float, ...]:
    """OpenCV's float32 Gaussian taps for GaussianBlur(float image, (0, 0), sigma): 8 sigma + 1 taps, odd."""
    ksize = int(round(sigma * 4 * 2 + 1)) | 1
    return tuple(cv2.getGaussianKernel(ksize, sigma, cv2.CV_32F).ravel().tolist())


def _gaussian_blur_float(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """cv2.GaussianBlur(float32 image, (0, 0), sigma): OpenCV's kernel size and float32 taps, BORDER_REFLECT_101;
    equal up to float rounding (summation order)."""
    taps = _float_gaussian(sigma)
    return _symmetric_pass(_symmetric_pass(image, taps, -1), taps, -2)


def _high_pass(samples: torch.Tensor, sigma: float) -> torch.Tensor:
    """samples - _gaussian_blur_float(samples, sigma) (float32), in fused kernels where the device has them (the
    same roundings in the same order: bit-identical)."""
    taps = _float_gaussian(sigma)
    radius = len(taps) // 2
    height, width = samples.shape[-2:]
    launch = fused_kernels.launcher(samples.device)
    if launch is None or min(height, width) <= radius:
        return samples - _gaussian_blur_float(samples, sigma)
    padded = _padded_planes(samples, radius)
    rows = _fused_float_pass(padded, taps, -1, width, launch)
    high = _fused_float_pass(rows, taps, -2, height, launch, values=samples.reshape(-1, height, width))
    return high.reshape(samples.shape)


def _earlier_mark_fold(luma: torch.Tensor, period: int) -> torch.Tensor | None:
    """The device half of watermark._earlier_mark: the area resampling (bit-exact), the high-pass and the fold of
    all whole tiles into one EARLIER_MARK_SAMPLES-square tile (float32, within float rounding of OpenCV's); only
    that tile goes to the host (watermark._earlier_mark_of_fold). None when no tile fits."""
    samples = _earlier_mark_samples(luma, period)
    if samples is None:
        return None
    size = EARLIER_MARK_SAMPLES
    samples = samples.to(torch.float32)
    high = _high_pass(samples, EARLIER_MARK_SIGMA)
    *lead, height, width = samples.shape
    return high.reshape(*lead, height // size, size, width // size, size).mean(dim=(-4, -2))


def _amplitude_small(luma: torch.Tensor) -> np.ndarray:
    """watermark._amplitude of this luma (device half, then host half)."""
    return _amplitude_from_detail(_amplitude_detail(luma).cpu().numpy())


def _earlier_mark_small(luma: torch.Tensor, period: int) -> tuple[int, float] | None:
    """watermark._earlier_mark of this luma (device half, then host half)."""
    folded = _earlier_mark_fold(luma, period)
    return None if folded is None else _earlier_mark_of_fold(folded.cpu().numpy().astype(np.float64), period)


def embed_watermark_torch(rgb: torch.Tensor, watermark_id: int, strength: float = 1.0) -> torch.Tensor:
    """A copy of ``rgb`` (HxWx3 uint8 tensor, any device) carrying ``watermark_id``: watermark.embed_watermark's
    mark, within 1 grey level of it, including its replacement of an earlier mark (re-marking).

    On the device: the luma, the full-resolution texture measure and its area downsampling, the re-marking check's
    area resampling, the bilinear upsampling of the amplitude to full size, the tile repetition and the rounding,
    saturating add. On the host: the 1/8-resolution amplitude map, the tile (watermark._tile) and the re-marking
    check on its 66 x 66-per-tile fold. Images with a side under 48 px come back unchanged.
    """
    return embed_watermarks_torch([rgb], [watermark_id], strength)[0]


def embed_watermarks_torch(images: list[torch.Tensor], watermark_ids: list[int],
                           strength: float = 1.0) -> list[torch.Tensor]:
    """``embed_watermark_torch`` for several images (any sizes) at once: the device halves are queued first, for
    the images of one size together (up to _IMAGES_PER_PASS per pass), their small results reach the host with one
    wait, then the marks are added image by image."""
    for rgb, watermark_id in zip(images, watermark_ids, strict=True):
        _check_image(rgb)
        _check_mark_arguments(watermark_id, strength)
    marked: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, int, torch.device], list[int]] = {}  # images of one size go through as one batch
    for position, rgb in enumerate(images):
        height, width = rgb.shape[:2]
        if min(height, width) < _MIN_SIDE:
            marked[position] = rgb.clone()
        else:
            by_size.setdefault((height, width, rgb.device), []).append(position)
    groups, small = [], []  # groups: (positions, period, whether an earlier-mark fold follows the detail maps)
    batches: dict[tuple[int, ...], torch.Tensor] = {}  # each pass's stacked images, for the marks' pass to reuse
    chunks = [(height, width, positions[start:start + _IMAGES_PER_PASS])
              for (height, width, _), positions in by_size.items()
              for start in range(0, len(positions), _IMAGES_PER_PASS)]
    for height, width, positions in chunks:
        period = _period(height, width)
        stacked = images[positions[0]][None] if len(positions) == 1 else torch.stack([images[p] for p in positions])
        batches[tuple(positions)] = stacked
        luma = _luma(stacked)
        small.append(_amplitude_detail(luma))
        folded = _earlier_mark_fold(luma, period)
        if folded is not None:
            small.append(folded)
        groups.append((positions, period, folded is not None))
    host = iter(to_host(small))
    pending, details, folds = [], [], {}  # pending: (position, period) in the order of details
    for positions, period, has_fold in groups:
        detail_maps = next(host)
        fold_tiles = next(host).astype(np.float64) if has_fold else None
        for slot, position in enumerate(positions):
            pending.append((position, period))
            details.append(detail_maps[slot])
            if fold_tiles is not None:
                folds[position] = fold_tiles[slot]
    # The re-marking check's pilot search for every row at once; only a row that may carry a mark (a margin below
    # the threshold, for float rounding) takes the exact per-row path, which decides.
    maybe_marked = set()
    if folds:
        scores = _pilot_z(np.stack(list(folds.values())), EARLIER_MARK_SAMPLES)
        maybe_marked = {position for position, z in zip(folds, scores) if z >= _PILOT_Z - 0.5}
    tables = []  # per pending row: its amplitude map and tile (float32), all uploaded together below
    for (position, period), detail in zip(pending, details):
        amplitude = _capped(_amplitude_from_detail(detail), strength).astype(np.float32, copy=False)
        earlier = _earlier_mark_of_fold(folds[position], period) if position in maybe_marked else None
        tile = _mark_tile(watermark_ids[position], period, earlier, float(np.mean(amplitude)))
        tables += [amplitude, np.asarray(tile, dtype=np.float32)]
    by_device: dict[torch.device, list[int]] = {}  # rows per device: one upload (one wait) for each
    for slot, (position, _) in enumerate(pending):
        by_device.setdefault(images[position].device, []).append(slot)
    for device, slots in by_device.items():
        uploaded = to_device([tables[2 * slot + k] for slot in slots for k in (0, 1)], device)
        # Same-size rows get their marks added together (a dozen full-resolution steps per batch, not per row).
        by_shape: dict[tuple, list[int]] = {}
        for index, slot in enumerate(slots):
            position, period = pending[slot]
            by_shape.setdefault((tuple(images[position].shape), period, tuple(uploaded[2 * index].shape)),
                                []).append(index)
        for (_, period, _), indices in by_shape.items():
            positions = [pending[slots[index]][0] for index in indices]
            for start in range(0, len(indices), _IMAGES_PER_PASS):
                part = slice(start, start + _IMAGES_PER_PASS)
                outs = _add_marks([images[p] for p in positions[part]],
                                  [uploaded[2 * index] for index in indices[part]],
                                  [uploaded[2 * index + 1] for index in indices[part]], period,
                                  batches.get(tuple(positions[part])))
                for position, out in zip(positions[part], outs):
                    marked[position] = out
    return marked  # type: ignore[return-value]


def _add_mark(rgb: torch.Tensor, amplitude: torch.Tensor, tile: torch.Tensor, period: int) -> torch.Tensor:
    """rgb plus the tile scaled by the amplitude map (upsampled to full size), as cv2.add does it; amplitude map
    and tile are float32 tensors on rgb's device."""
    return _add_marks([rgb], [amplitude], [tile], period)[0]


def _add_marks(images: list[torch.Tensor], amplitudes: list[torch.Tensor], tiles: list[torch.Tensor],
               period: int, stacked: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``_add_mark`` for same-size images (and amplitude maps, tiles of one period) in one pass: each step is one
    launch for all of them; the arithmetic per pixel is the same. ``stacked``: the images already stacked (the
    analysis pass's batch), else they are stacked here."""
    device = images[0].device
    height, width = images[0].shape[:2]
    amplitude = torch.stack(amplitudes) if len(amplitudes) > 1 else amplitudes[0][None]  # (B, small h, small w)
    tile = torch.stack(tiles) if len(tiles) > 1 else tiles[0][None]
    rgb = stacked if stacked is not None else torch.stack(images) if len(images) > 1 else images[0][None]
    # cv2.resize(amplitude, (width, height), INTER_LINEAR): horizontal pass on the small rows here, the vertical
    # one per band below.
    x0, x1, ax0, ax1 = _taps_on(_linear_taps, amplitude.shape[2], width, device)
    y0, y1, by0, by1 = _taps_on(_linear_taps, amplitude.shape[1], height, device)
    rows = amplitude[:, :, x0] * ax0 + amplitude[:, :, x1] * ax1  # (B, small height, width)
    if triton_kernels.use_triton_mark(device):
        # One kernel for the whole batch: the vertical interpolation, the tile's repeat and the cast inside it.
        return list(triton_kernels.mark_planes(rgb, rows, y0, y1, by0, by1, tile).permute(0, 2, 3, 1))
    count = len(images)
    band = period * max(1, min(-(-height // period), _BAND_PIXELS // (period * width * count)))  # whole tile rows
    pattern = tile.repeat(1, band // period, -(-width // period))[:, :, :width]
    launch = fused_kernels.launcher(device)
    # The fused kernel's three planes land in (B, 3, H, W) memory, each row contiguous, and the images come back as
    # HxWx3 views of it: nvJPEG takes its planes as they are (no channels-first copy per image before encoding).
    out = torch.empty_like(rgb) if launch is None else rgb.new_empty((count, 3, height, width)).permute(0, 2, 3, 1)
    for top in range(0, height, band):
        bottom = min(height, top + band)
        upper, lower = rows.index_select(1, y0[top:bottom]), rows.index_select(1, y1[top:bottom])
        if launch is not None:  # the steps below in one kernel per pixel; the copies cast (exact integers)
            band_rgb = rgb[:, top:bottom]
            planes = launch(fused_kernels.mark_kernel(), [
                band_rgb[..., 0], band_rgb[..., 1], band_rgb[..., 2], upper, lower, by0[top:bottom, None],
                by1[top:bottom, None], pattern[:, : bottom - top]])
            for channel, plane in enumerate(planes):
                out[:, top:bottom, :, channel] = plane
            continue
        full = upper * by0[top:bottom, None] + lower * by1[top:bottom, None]
        # cv2.add(uint8, float32, dtype=CV_8U) rounds the delta (half to even), then adds and saturates.
        delta = torch.round(full * pattern[:, : bottom - top]).clamp_(-256, 256).to(torch.int16)
        out[:, top:bottom] = (rgb[:, top:bottom].to(torch.int16) + delta[..., None]).clamp_(0, 255).to(torch.uint8)
    return list(out)


# ---------------------------------------------------------------------------------------------------------------
# Encoding.


@functools.lru_cache(maxsize=1)
def _device_jpeg_encoder() -> Callable[..., Any] | None:
    """torchvision.io.encode_jpeg, or None where torchvision is missing or does not load against this torch."""
    try:
        from torchvision.io import encode_jpeg
    except Exception:  # noqa: BLE001 - ImportError, or a torchvision built for another torch (RuntimeError, OSError)
        return None
    return encode_jpeg


def jpeg_encoder_for(rgb: torch.Tensor) -> str:
    """Which encoder encode_jpeg_torch uses for this tensor: "nvjpeg" (torchvision on the CUDA device) when it is
    on a CUDA device and torchvision is importable, else "pillow" (imaging.encode_image on the host). torchvision
    is not even imported for a tensor that is not on CUDA."""
    if rgb.device.type != "cuda":
        return "pillow"
    return "nvjpeg" if _device_jpeg_encoder() is not None else "pillow"


def encode_jpeg_torch(rgb: torch.Tensor, quality: int, xmp: bytes | None = None) -> bytes:
    """JPEG bytes of an HxWx3 uint8 tensor, with ``xmp`` (when given) as an APP1 XMP segment.

    On a CUDA device with torchvision importable: nvJPEG through ``torchvision.io.encode_jpeg`` on the device (only
    the compressed bytes come to the host), then the XMP segment inserted by imaging.insert_jpeg_xmp. Otherwise (a CPU
    tensor, or no torchvision) the fallback: ``imaging.encode_image`` (Pillow) on the host copy of the pixels,
    byte-identical to what pipeline.finish writes for the same pixels.
    """
    return encode_jpegs_torch([rgb], [quality], [xmp])[0]


def encode_jpegs_torch(images: list[torch.Tensor], qualities: list[int],
                       xmps: list[bytes | None]) -> list[bytes]:
    """``encode_jpeg_torch`` for several images: on CUDA one batched nvJPEG call per quality, and the compressed
    bytes of all of them reach the host with one wait."""
    for rgb, quality in zip(images, qualities, strict=True):
        _check_image(rgb)
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be 1..100, got {quality}")
    encoded: list[bytes | None] = [None] * len(images)
    on_device: dict[int, list[int]] = {}  # quality -> positions
    for position, rgb in enumerate(images):
        if jpeg_encoder_for(rgb) == "nvjpeg":
            on_device.setdefault(int(qualities[position]), []).append(position)
        else:
            encoded[position] = encode_image(rgb.cpu().numpy(), "jpeg", int(qualities[position]),
                                             xmp=xmps[position])
    if on_device:
        encode = _device_jpeg_encoder()
        assert encode is not None
        positions, streams = [], []
        for quality, group in on_device.items():
            planes = [images[p].permute(2, 0, 1).contiguous() for p in group]
            positions.extend(group)
            try:
                streams.extend(encode(planes, quality=quality))  # torchvision >= 0.20 batches a list on CUDA
            except (TypeError, RuntimeError):
                streams.extend(encode(plane, quality=quality) for plane in planes)
        for position, stream in zip(positions, to_host(streams)):
            jpeg = stream.tobytes()
            encoded[position] = insert_jpeg_xmp(jpeg, xmps[position]) if xmps[position] else jpeg
    return encoded  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# The whole postprocess of one row, or of a batch.


@dataclass
class FinishRow:
    """One row for ``finish_torch_batch``: pipeline.finish's arguments, with the target as a tensor."""

    target: torch.Tensor
    fused_crop: torch.Tensor | np.ndarray
    blend_mask: torch.Tensor | np.ndarray
    target_matrix: np.ndarray
    options: FusionOptions
    metadata: dict[str, Any]


def finish_torch(target: torch.Tensor, fused_crop: torch.Tensor | np.ndarray, blend_mask: torch.Tensor | np.ndarray,
                 target_matrix: np.ndarray, options: FusionOptions, metadata: dict[str, Any],
                 label_text: str = DEFAULT_LABEL,
                 label_position: str = DEFAULT_POSITION) -> tuple[bytes, dict[str, Any]]:
    """pipeline.finish on tensors: paste back, label, watermark and encode on target's device; returns the encoded
    image and the completed metadata (the same keys, timings "paste", "watermark" and "encode" in ms).

    The visible label (OPTIONS visible_label) is drawn by label.label_box (OpenCV text) on a host copy of the
    label's box only, which then goes back to the device: exact, and only when the label is asked for.
    JPEG is encoded by encode_jpeg_torch (nvJPEG on CUDA); PNG and WebP by imaging.encode_image on the host.
    """
    result = finish_torch_batch([FinishRow(target, fused_crop, blend_mask, target_matrix, options, metadata)],
                                label_text, label_position)[0]
    if isinstance(result, Exception):
        raise result
    return result


def finish_torch_batch(rows: list[FinishRow], label_text: str = DEFAULT_LABEL,
                       label_position: str = DEFAULT_POSITION) -> list[tuple[bytes, dict[str, Any]] | Exception]:
    """``finish_torch`` for a batch: paste and label per row, then the watermarks of all rows and the JPEG encodes
    of all rows together (``embed_watermarks_torch``, ``encode_jpegs_torch``). A row that fails (e.g. a crop of the
    wrong shape) gets its exception in its place; the others go on. Paste, watermark and encode timings are the
    batch's time divided by its rows."""
    results: list[tuple[bytes, dict[str, Any]] | Exception | None] = [None] * len(rows)
    pasted: dict[int, tuple[torch.Tensor, FusionOptions]] = {}
    started = time.perf_counter()
    pastes = paste_back_rows_torch([(row.target, row.fused_crop, row.blend_mask, row.target_matrix) for row in rows])
    for position, (row, fused) in enumerate(zip(rows, pastes)):
        try:
            if isinstance(fused, Exception):
                raise fused
            options = row.options.with_watermark_id()
            if options.visible_label:  # only the label's box makes the round trip to the host (cv2 draws it)
                layout = label_layout(int(fused.shape[1]), int(fused.shape[0]), label_text, label_position)
                x1, y1, x2, y2 = layout.box
                fused[y1:y2, x1:x2] = torch.from_numpy(
                    label_box(fused[y1:y2, x1:x2].cpu().numpy(), layout, label_text)).to(fused.device)
            pasted[position] = (fused, options)
        except Exception as error:  # noqa: BLE001 - the row's own failure, reported in its place
            results[position] = error
    if not pasted:
        return results  # type: ignore[return-value]
    order = sorted(pasted)
    devices = {pasted[p][0].device for p in order}
    # Like the watermark's and the encode's, the batch's time per row: timing each paste would make the host wait
    # for the GPU once per row.
    paste_ms = _batch_ms(started, devices, len(order))
    started = time.perf_counter()
    marked = embed_watermarks_torch([pasted[p][0] for p in order],
                                    [parse_watermark_id(pasted[p][1].watermark_id) for p in order])
    watermark_ms = _batch_ms(started, devices, len(order))
    started = time.perf_counter()
    xmps = {p: build_xmp(pasted[p][1].watermark_id, SOFTWARE) for p in order}
    jpeg_rows = [(p, image) for p, image in zip(order, marked) if pasted[p][1].format == "jpeg"]
    encoded = dict(zip([p for p, _ in jpeg_rows],
                       encode_jpegs_torch([image for _, image in jpeg_rows],
                                          [pasted[p][1].quality for p, _ in jpeg_rows],
                                          [xmps[p] for p, _ in jpeg_rows])))
    for p, image in zip(order, marked):
        if p not in encoded:
            options = pasted[p][1]
            encoded[p] = encode_image(image.cpu().numpy(), options.format, options.quality, xmp=xmps[p],
                                      text={"AI-generated": "true", "Software": SOFTWARE})
    encode_ms = _batch_ms(started, devices, len(order))
    for p, image in zip(order, marked):
        options, metadata = pasted[p][1], rows[p].metadata
        timings = {"paste": paste_ms, "watermark": watermark_ms, "encode": encode_ms}
        metadata.setdefault("timings_ms", {}).update(timings)
        metadata.update({
            "watermark_id": options.watermark_id,
            "visible_label": options.visible_label,
            "format": options.format,
            "output": {"width": int(image.shape[1]), "height": int(image.shape[0]), "bytes": len(encoded[p])},
        })
        results[p] = (encoded[p], metadata)
    return results  # type: ignore[return-value]


def _batch_ms(started: float, devices: set[torch.device], rows: int) -> float:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return round((time.perf_counter() - started) * 1000.0 / max(1, rows), 2)


def warm_up(device: torch.device, width: int = 1920, height: int = 1080) -> float:
    """One synthetic row (``benchmark_rows``) through finish_torch_batch on ``device``, so that the first real
    request does not pay for torchvision's import, nvJPEG's set-up, kernel loading and the caches of taps and tiles.
    The GPU model runs it at load. Returns its ms, the row's making included."""
    started = time.perf_counter()
    result = finish_torch_batch(benchmark_rows(1, device, width, height))[0]
    if isinstance(result, Exception):
        raise RuntimeError(f"postprocess warm-up failed: {result}") from result
    return _elapsed_ms(started, device)


# ---------------------------------------------------------------------------------------------------------------
# Benchmark.


def _benchmark_inputs(width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A width x height photo (the shipped sample, resized), a face-sized fused crop cut from it (brightened, so the
    paste changes pixels), a soft elliptical mask and the image -> crop matrix."""
    from facefuse.alignment import CROP_SIZE, crop_to_tensor, warp_to_crop
    from facefuse.imaging import decode_image
    from facefuse.samples import sample_image_path

    photo = decode_image(sample_image_path("t1.jpg").read_bytes())
    image = cv2.resize(photo, (width, height), interpolation=cv2.INTER_LINEAR)
    angle, scale = math.radians(12.0), CROP_SIZE / (0.28 * min(width, height))
    centre = np.array([0.45 * width, 0.4 * height])
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    matrix = np.zeros((2, 3))
    matrix[:, :2] = rotation
    matrix[:, 2] = CROP_SIZE / 2.0 - rotation @ centre
    crop = cv2.convertScaleAbs(warp_to_crop(image, matrix), alpha=1.1, beta=12)
    yy, xx = np.mgrid[:CROP_SIZE, :CROP_SIZE] / (CROP_SIZE - 1.0) - 0.5
    mask = np.clip((0.42 - np.hypot(xx, 0.8 * yy)) / 0.08, 0.0, 1.0).astype(np.float32)[None]
    return image, crop_to_tensor(crop), mask, matrix.astype(np.float32)


def benchmark_rows(count: int, device: torch.device, width: int = 1920, height: int = 1080) -> list[FinishRow]:
    """``count`` rows of the benchmark photo (``_benchmark_inputs``) for finish_torch_batch, each with its own copy
    of the photo on ``device`` (a JPEG at quality 92): the model's warm-up and bench's profiles."""
    image, crop, mask, matrix = _benchmark_inputs(width, height)
    options = FusionOptions(format="jpeg", quality=92)
    # Crop and mask on the device, as the served model gets them (fusion's outputs, preprocess's mask).
    crop_on_device, mask_on_device = torch.from_numpy(crop).to(device), torch.from_numpy(mask).to(device)
    return [FinishRow(image_to_device(image, device), crop_on_device, mask_on_device, matrix, options, {})
            for _ in range(count)]


def benchmark(width: int = 1920, height: int = 1080, repeats: int = 10, fmt: str = "jpeg",
              device: str | torch.device | None = None) -> dict[str, Any]:
    """Median ms per image of pipeline.finish and of finish_torch (on CUDA when available, else CPU) on one
    width x height photo, with each one's median stage timings. The image is on the device before timing
    (``upload_ms`` is that copy, reported apart)."""
    from facefuse.pipeline import finish

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    image, crop, mask, matrix = _benchmark_inputs(width, height)
    options = FusionOptions(format=fmt, quality=92, watermark_id="0123456789abcdef")
    started = time.perf_counter()
    target = torch.from_numpy(image).to(device)
    upload_ms = _elapsed_ms(started, device)
    crop_t, mask_t = torch.from_numpy(crop).to(device), torch.from_numpy(mask).to(device)

    def run(function: Callable[[], tuple[bytes, dict[str, Any]]]) -> dict[str, Any]:
        function()  # warm-up: kernel selection, allocator, tile cache
        totals, stages = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            _, metadata = function()
            totals.append(_elapsed_ms(started, device))
            stages.append(metadata["timings_ms"])
        return {"ms_per_image": float(np.median(totals)),
                **{key: float(np.median([stage[key] for stage in stages])) for key in ("paste", "watermark", "encode")}}

    return {
        "size": f"{width}x{height}", "format": fmt, "device": str(device), "torch_threads": torch.get_num_threads(),
        "jpeg_encoder": jpeg_encoder_for(target) if fmt == "jpeg" else "encode_image",
        "finish": run(lambda: finish(image, crop, mask, matrix, options, {})),
        "finish_torch": run(lambda: finish_torch(target, crop_t, mask_t, matrix, options, {})),
        "upload_ms": upload_ms,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(benchmark(), indent=2))

"""OpenAI Triton kernels: the watermark's add (HxWx3 uint8 pixels in, (3,H,W) uint8 planes out), block means.

The jiterator kernel (``fused_kernels.mark_kernel``) computes in float32 and returns three float32 planes, which
are then copied into uint8 planes; its inputs are the amplitude's two full-size rows (gathered beforehand) and the
tile repeated to full size: ~26 bytes of memory traffic per pixel besides the pixels themselves. This kernel reads
the pixels (3 bytes), the small amplitude rows and the tile (cached), and writes the planes (3 bytes): the
interpolation, the tile's repeat and the cast happen in registers. The arithmetic is the jiterator kernel's, in its
order and without FMA contraction (``enable_fp_fusion=False``), so the results are bit-identical to it and to the
torch path (postprocess_torch, which matches OpenCV).

Triton ships with CUDA builds of torch and compiles with the host's C compiler on first use. Where it is missing or
fails (no compiler, an old driver), the jiterator kernel stays in use and stderr says so once. The service uses
these kernels on CUDA only; the tests run them on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``).

``block_means`` is the detector's whole-factor shrink read straight from the uint8 pixels (avg_pool2d's values
without a float copy of the batch); it is opt-in (FACEFUSE_TRITON_SHRINK=on) until a GPU run measures it.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import torch

from facefuse import fused_kernels

__all__ = ["BLOCK", "SHRINK_VARIABLE", "block_means", "mark_planes", "use_triton_mark", "use_triton_shrink"]

# Pixels of one image row per program: a multiple of the warp's 32 lanes; 1080p rows take 4 programs.
BLOCK = 512
# rintf's round half to even, without libdevice (which Triton's interpreter lacks): adding and then taking away
# 1.5 * 2**23 leaves the nearest integer of any |v| < 2**22, ties to even, in float32's default rounding.
_ROUNDING_MAGIC = 12582912.0


@functools.lru_cache(maxsize=2)
def _mark_kernel(interpret: bool) -> Any:
    """The jitted kernel (``interpret``: whether TRITON_INTERPRET was on when it was defined, which decides whether
    it compiles for the GPU or runs in the interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def facefuse_mark_planes(rgb, image_stride, row_stride, pixel_stride, channel_stride, rows, upper_row,
                             lower_row, upper_weight, lower_weight, tile, planes, height, width, small_height,
                             period, magic, BLOCK: tl.constexpr):
        y = tl.program_id(0)
        image = tl.program_id(1).to(tl.int64)
        xs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        inside = xs < width
        row_base = image * small_height * width
        upper = tl.load(rows + row_base + tl.load(upper_row + y) * width + xs, mask=inside, other=0.0)
        lower = tl.load(rows + row_base + tl.load(lower_row + y) * width + xs, mask=inside, other=0.0)
        amplitude = upper * tl.load(upper_weight + y) + lower * tl.load(lower_weight + y)
        pattern = tl.load(tile + (image * period + y % period) * period + xs % period, mask=inside, other=0.0)
        # Clamped before rounding so that the rounding trick holds; the +-256 clamp after it gives what rounding
        # first and clamping after would.
        product = tl.minimum(tl.maximum(amplitude * pattern, -512.0), 512.0)
        delta = tl.minimum(tl.maximum((product + magic) - magic, -256.0), 256.0)
        pixel = image * image_stride + y.to(tl.int64) * row_stride + xs.to(tl.int64) * pixel_stride
        plane = height.to(tl.int64) * width
        for channel in tl.static_range(3):
            value = tl.load(rgb + pixel + channel * channel_stride, mask=inside, other=0).to(tl.float32)
            value = tl.minimum(tl.maximum(value + delta, 0.0), 255.0)
            tl.store(planes + (image * 3 + channel) * plane + y * width + xs, value.to(tl.uint8), mask=inside)

    return facefuse_mark_planes


@functools.lru_cache(maxsize=2)
def _block_mean_kernel(interpret: bool) -> Any:
    """The jitted block-means kernel (see ``_mark_kernel`` for ``interpret``)."""
    import triton
    import triton.language as tl

    @triton.jit
    def facefuse_block_means(pixels, means, height, width, out_height, out_width, divisor,
                             FACTOR: tl.constexpr, BLOCK: tl.constexpr):
        y = tl.program_id(0)
        plane = tl.program_id(1).to(tl.int64)
        xs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        inside = xs < out_width
        source = pixels + plane * height * width + (y * FACTOR).to(tl.int64) * width + xs * FACTOR
        total = xs.to(tl.float32) * 0.0  # (tl.zeros is a jitted helper the interpreter cannot reach from here)
        for dy in tl.static_range(FACTOR):  # integer sums below 2**24: exact in float32 in any order
            for dx in tl.static_range(FACTOR):
                total += tl.load(source + dy * width + dx, mask=inside, other=0).to(tl.float32)
        tl.store(means + (plane * out_height + y) * out_width + xs, total / divisor, mask=inside)

    return facefuse_block_means


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch(make_kernel: Any, arguments: list, rows: int, planes: int, row_length: int, block: int,
            device: torch.device, **constants: int) -> None:
    """Runs a kernel over a grid of (rows, planes, blocks of one row). Compiled: on the tensors' own CUDA device
    (Triton launches on the current one) and without FMA contraction (every product and sum rounds on its own, as
    in the other paths). Interpreted (tests on the CPU): one program per row, since the interpreter pays per
    program, not per element."""
    interpret = _interpreting()
    if interpret:
        block = 1 << max(row_length - 1, 1).bit_length()
    grid = (rows, planes, -(-row_length // block))
    kernel = make_kernel(interpret)
    if interpret:
        kernel[grid](*arguments, BLOCK=block, **constants)
        return
    with torch.cuda.device(device):
        kernel[grid](*arguments, BLOCK=block, enable_fp_fusion=False, **constants)


def mark_planes(rgb: torch.Tensor, rows: torch.Tensor, upper_row: torch.Tensor, lower_row: torch.Tensor,
                upper_weight: torch.Tensor, lower_weight: torch.Tensor, tile: torch.Tensor) -> torch.Tensor:
    """The marked images as (B,3,H,W) uint8 planes.

    rgb: (B,H,W,3) uint8, any strides (nvJPEG's images are HxWx3 views of channel planes). rows: (B,h,W) float32,
    the amplitude maps after their horizontal interpolation to full width. upper_row/lower_row: (H,) int64, the row
    of ``rows`` above and below each image row; upper_weight/lower_weight: (H,) float32, their weights
    (cv2.resize's vertical INTER_LINEAR taps). tile: (B,P,P) float32, each image's mark tile, repeated over the
    image from its top left corner."""
    count, height, width, channels = rgb.shape
    if channels != 3 or rgb.dtype != torch.uint8 or rows.shape[0] != count or rows.shape[2] != width:
        raise ValueError(f"mark_planes: rgb {tuple(rgb.shape)} {rgb.dtype}, rows {tuple(rows.shape)}")
    if tile.shape[0] != count or tile.shape[1] != tile.shape[2]:
        raise ValueError(f"mark_planes: tile {tuple(tile.shape)} for {count} images")
    planes = rgb.new_empty((count, 3, height, width))
    if count == 0 or height == 0 or width == 0:
        return planes
    arguments = [rgb, *rgb.stride(), rows.contiguous().float(), upper_row.contiguous().to(torch.int64),
                 lower_row.contiguous().to(torch.int64), upper_weight.contiguous().float(),
                 lower_weight.contiguous().float(), tile.contiguous().float(), planes,
                 height, width, rows.shape[1], tile.shape[1], _ROUNDING_MAGIC]
    _launch(_mark_kernel, arguments, height, count, width, BLOCK, rgb.device)
    return planes


def block_means(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """(B,C,H,W) uint8 -> (B,C,H/factor,W/factor) float32: the mean of each factor x factor block, read straight from
    the pixels (no float copy of the batch): ``F.avg_pool2d(pixels.float(), factor)`` bit for bit (the sums are
    exact integers; one division each, as avg_pool2d's)."""
    if pixels.dim() != 4 or pixels.dtype != torch.uint8 or factor < 1:
        raise ValueError(f"block_means: pixels {tuple(pixels.shape)} {pixels.dtype}, factor {factor}")
    count, channels, height, width = pixels.shape
    out_height, out_width = height // factor, width // factor
    means = torch.empty((count, channels, out_height, out_width), dtype=torch.float32, device=pixels.device)
    if means.numel() == 0:
        return means
    arguments = [pixels.contiguous(), means, height, width, out_height, out_width, float(factor * factor)]
    _launch(_block_mean_kernel, arguments, out_height, count * channels, out_width, 256, pixels.device,
            FACTOR=factor)
    return means


def _self_check(device: torch.device) -> None:
    """Compiles the kernel and checks it against the torch path's arithmetic (one elementwise operation at a time)
    on cases built to catch what could go wrong: halves that round to even, both clamps, and a pixel whose
    interpolation gives 2**-24 with FMA contraction and 0 without (times the pattern: 1.5, which rounds to 2 or 0)."""
    tiny, big = 2.0 ** -12, 1.5 * 2.0 ** 24
    rgb = torch.arange(2 * 3 * 5 * 3, dtype=torch.int64, device=device).reshape(2, 3, 5, 3).mul(7).remainder(256)
    rows = torch.tensor([[[1 + tiny, 0.5, 0.5, 0.5, 0.5], [-(1 + 2 * tiny), 0.5, 0.5, 0.5, 0.5]],
                         [[0.5] * 5, [1.0] * 5]], device=device)
    upper_row = torch.zeros(3, dtype=torch.int64, device=device)
    lower_row = torch.ones(3, dtype=torch.int64, device=device)
    upper_weight = torch.full((3,), 1 + tiny, device=device)
    lower_weight = torch.tensor([1.0, 1.0, 0.0], device=device)
    tile = torch.tensor([[[big, 3.0], [5.0, -3.0]], [[600.0, -1.0], [-600.0, 7.0]]], device=device)
    planes = mark_planes(rgb.to(torch.uint8), rows, upper_row, lower_row, upper_weight, lower_weight, tile)
    upper, lower = rows[:, upper_row], rows[:, lower_row]
    amplitude = upper * upper_weight[:, None] + lower * lower_weight[:, None]
    delta = torch.round(amplitude * tile.repeat(1, 2, 3)[:, :3, :5]).clamp(-256, 256)
    expected = (rgb + delta[..., None].to(torch.int64)).clamp(0, 255).to(torch.uint8).permute(0, 3, 1, 2)
    if not torch.equal(planes, expected):
        raise RuntimeError("the Triton mark kernel's self-check gave other pixels than the torch path's arithmetic")


def _block_means_self_check(device: torch.device) -> None:
    """Compiles the block-means kernel and checks it against avg_pool2d on an odd-sized batch (the edge blocks that
    do not fit are left out by both)."""
    pixels = torch.arange(2 * 3 * 7 * 11, device=device).mul(37).remainder(256).to(torch.uint8).reshape(2, 3, 7, 11)
    for factor in (2, 3):
        if not torch.equal(block_means(pixels, factor), torch.nn.functional.avg_pool2d(pixels.float(), factor)):
            raise RuntimeError(f"the Triton block-means kernel's self-check (factor {factor}) differs from avg_pool2d")


# Per kernel: its self-check (looked up by name when it runs) and what is used in its place when it fails.
_KERNELS = {"mark": ("_self_check", "the watermark's add uses the jiterator kernel"),
            "block means": ("_block_means_self_check", "the working-image shrink uses avg_pool2d")}


@functools.lru_cache(maxsize=16)
def _available_on(device: torch.device, kernel: str = "mark") -> bool:
    check, instead = _KERNELS[kernel]
    try:
        globals()[check](device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 - ImportError (no triton), a compiler or driver failure
        print(f"[facefuse] the Triton {kernel} kernel is unavailable on {device} ({type(error).__name__}: "
              f"{str(error).strip()[:300]}); {instead}", file=sys.stderr, flush=True)
        return False
    return True


def _cuda(device: torch.device) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def use_triton_mark(device: torch.device) -> bool:
    """Whether the watermark's add runs as ``mark_planes`` on ``device``: a CUDA device, FACEFUSE_FUSED_KERNELS at
    "auto" (its default; "jiterator" keeps the jiterator kernels only, "off" the torch path), and Triton importable
    with the kernel compiling and passing its self-check (checked once per device)."""
    setting = os.environ.get(fused_kernels.ENVIRONMENT_VARIABLE, "auto").lower()
    if device.type != "cuda" or setting in ("off", "0", "no", "jiterator") or fused_kernels.launcher(device) is None:
        return False
    return _available_on(_cuda(device))


# Opt-in until a GPU run measures it against avg_pool2d (bench.profile_shrink's "triton block means").
SHRINK_VARIABLE = "FACEFUSE_TRITON_SHRINK"


def use_triton_shrink(device: torch.device) -> bool:
    """Whether the detector's whole-factor shrink runs as ``block_means`` on ``device``: a CUDA device,
    FACEFUSE_TRITON_SHRINK=on (off by default: not yet measured on a GPU), the fused kernels not switched off, and the
    kernel compiling and passing its self-check."""
    if device.type != "cuda" or os.environ.get(SHRINK_VARIABLE, "off").lower() not in ("on", "1", "yes"):
        return False
    if os.environ.get(fused_kernels.ENVIRONMENT_VARIABLE, "auto").lower() in ("off", "0", "no"):
        return False
    return _available_on(_cuda(device), "block means")

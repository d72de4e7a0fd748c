"""OpenAI Triton kernels: the watermark's add (HxWx3 uint8 pixels in, (3,H,W) uint8 planes out), its texture map,
block means.

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
without a float copy of the batch; on an H100 0.107 vs 0.479 ms per 16 1080p photos), on by default
(FACEFUSE_TRITON_SHRINK=off keeps avg_pool2d);
``watermark_detail`` is the watermark's texture map in one pass over the luma (in place of a padded float copy, two
blur kernels, a float copy and a pooling; on an H100 0.129 vs 0.295 ms per 8 1080p rows), on by default
(FACEFUSE_TRITON_DETAIL=off keeps the jiterator kernels). The kernels' source is ``facefuse/triton_source.py``.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from facefuse import fused_kernels

__all__ = ["BLOCK", "DETAIL_VARIABLE", "SHRINK_VARIABLE", "block_means", "detail_self_check_luma", "mark_planes",
           "use_triton_detail", "use_triton_mark", "use_triton_shrink", "watermark_detail"]

# Pixels of one image row per program: a multiple of the warp's 32 lanes; 1080p rows take 4 programs.
BLOCK = 512
# rintf's round half to even, without libdevice (which Triton's interpreter lacks): adding and then taking away
# 1.5 * 2**23 leaves the nearest integer of any |v| < 2**22, ties to even, in float32's default rounding.
_ROUNDING_MAGIC = 12582912.0


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> ModuleType:
    """``facefuse.triton_source`` loaded for one mode: ``triton.jit`` reads TRITON_INTERPRET when it decorates, so
    the module is executed once per value (the tests' interpreter, the GPU's compiler), each copy with its own
    module globals, where the kernels find their helper functions."""
    import importlib.util

    name = "facefuse.triton_source" + ("_interpreted" if interpret else "")
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("triton_source.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch(kernel_name: str, arguments: list, rows: int, planes: int, row_length: int, block: int,
            device: torch.device, **constants: int) -> None:
    """Runs a kernel over a grid of (rows, planes, blocks of one row). Compiled: on the tensors' own CUDA device
    (Triton launches on the current one) and without FMA contraction (every product and sum rounds on its own, as
    in the other paths). Interpreted (tests on the CPU): one program per row, since the interpreter pays per
    program, not per element."""
    interpret = _interpreting()
    if interpret:
        block = 1 << max(row_length - 1, 1).bit_length()
    grid = (rows, planes, -(-row_length // block))
    kernel = getattr(_kernels(interpret), kernel_name)
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
    _launch("facefuse_mark_planes", arguments, height, count, width, BLOCK, rgb.device)
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
    _launch("facefuse_block_means", arguments, out_height, count * channels, out_width, 256, pixels.device,
            FACTOR=factor)
    return means


def watermark_detail(luma: torch.Tensor, taps: tuple[int, ...], factor: int) -> torch.Tensor:
    """The watermark's texture map in one pass: (B,H,W) luma (integers 0..255, any dtype) -> (B,H/factor,W/factor)
    uint8, the INTER_AREA downsampling of |luma - GaussianBlur(luma)|: cv2's 8-bit fixed-point 5-tap blur (``taps``,
    8 fraction bits, BORDER_REFLECT_101) and its whole-factor area mean, bit for bit. ``factor``: a power of two of
    at least 4 that divides both sides (2 rounds half up in cv2; other factors have inexact divisions)."""
    if luma.dim() != 3 or len(taps) != 5 or taps != taps[::-1] or factor < 4 or factor & (factor - 1):
        raise ValueError(f"watermark_detail: luma {tuple(luma.shape)}, taps {taps}, factor {factor}")
    count, height, width = luma.shape
    if height % factor or width % factor:  # (so each side is 0 or at least 4: the reflected borders fit)
        raise ValueError(f"watermark_detail: {height}x{width} is not a multiple of {factor}")
    out_height, out_width = height // factor, width // factor
    detail = torch.empty((count, out_height, out_width), dtype=torch.uint8, device=luma.device)
    if detail.numel() == 0:
        return detail
    arguments = [luma.contiguous(), detail, height, width, out_height, out_width, *taps[:3]]
    _launch("facefuse_watermark_detail", arguments, out_height, count, out_width, 64, luma.device, FACTOR=factor,
            SHIFT=2 * (factor.bit_length() - 1))
    return detail


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


def detail_self_check_luma() -> torch.Tensor:
    """The detail self-check's luma (2 x 48 x 64, seeded): every cell touches a border or two; among the 96 cells'
    sums some end exactly halfway (32 of 64) with an even and with an odd quotient (tests assert it)."""
    generator = torch.Generator().manual_seed(11)
    luma = torch.randint(0, 256, (2, 48, 64), generator=generator, dtype=torch.int32)
    luma[1, 16:] //= 37  # dark, low-contrast rows: small sums
    return luma


def _detail_self_check(device: torch.device) -> None:
    """Compiles the texture-map kernel and checks it against the torch path (``postprocess_torch``'s blur and area
    arithmetic, OpenCV's bit for bit)."""
    from facefuse import postprocess_torch  # the torch path (it imports this module: not at import time)

    luma = detail_self_check_luma().to(device)
    expected = postprocess_torch.detail_map_reference(luma)
    got = watermark_detail(luma.float(), postprocess_torch.detail_taps(), postprocess_torch.AMPLITUDE_REDUCTION)
    if not torch.equal(got, expected):
        raise RuntimeError("the Triton texture-map kernel's self-check gave other values than the torch path")


# Per kernel: its self-check (looked up by name when it runs) and what is used in its place when it fails.
_KERNELS = {"mark": ("_self_check", "the watermark's add uses the jiterator kernel"),
            "block means": ("_block_means_self_check", "the working-image shrink uses avg_pool2d"),
            "texture map": ("_detail_self_check", "the watermark's texture map uses the jiterator kernels")}


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


def _triton_allowed(device: torch.device) -> bool:
    """A CUDA device and FACEFUSE_FUSED_KERNELS at "auto" (its default; "jiterator" means no Triton kernel at all,
    "off" no fused kernel)."""
    setting = os.environ.get(fused_kernels.ENVIRONMENT_VARIABLE, "auto").lower()
    return device.type == "cuda" and setting not in ("off", "0", "no", "jiterator")


def use_triton_mark(device: torch.device) -> bool:
    """Whether the watermark's add runs as ``mark_planes`` on ``device``: Triton allowed there (``_triton_allowed``),
    the jiterator kernels available (its fallback), and Triton importable with the kernel compiling and passing its
    self-check (checked once per device)."""
    if not _triton_allowed(device) or fused_kernels.launcher(device) is None:
        return False
    return _available_on(_cuda(device))


# Both on by default, as measured on an H100 (bench.profile_shrink's "triton block means", bench.device_checks,
# bench.profile_request's postprocess); each variable's "off" keeps the torch / jiterator kernels.
SHRINK_VARIABLE = "FACEFUSE_TRITON_SHRINK"
DETAIL_VARIABLE = "FACEFUSE_TRITON_DETAIL"


def _switched_on(variable: str, device: torch.device, kernel: str) -> bool:
    """Triton allowed on ``device`` (``_triton_allowed``), ``variable`` not switched off (on when unset), and the
    kernel compiling and passing its self-check."""
    if not _triton_allowed(device) or os.environ.get(variable, "on").lower() not in ("on", "1", "yes"):
        return False
    return _available_on(_cuda(device), kernel)


def use_triton_shrink(device: torch.device) -> bool:
    """Whether the detector's whole-factor shrink runs as ``block_means`` on ``device``: on by default
    (FACEFUSE_TRITON_SHRINK=off keeps avg_pool2d; on an H100, 16 1080p photos: 0.107 vs 0.479 ms, equal values)."""
    return _switched_on(SHRINK_VARIABLE, device, "block means")


def use_triton_detail(device: torch.device) -> bool:
    """Whether the watermark's texture map runs as ``watermark_detail`` on ``device``: on by default
    (FACEFUSE_TRITON_DETAIL=off keeps the jiterator kernels; on an H100, 8 1080p rows: 0.129 vs 0.295 ms)."""
    return _switched_on(DETAIL_VARIABLE, device, "texture map")

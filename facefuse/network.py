"""Fusion network v2: both aligned crops are warped onto the intermediate face shape (thin-plate splines
evaluated on a sampling grid), the source is colour-matched to the target inside a brows-to-chin mask drawn
from the dense landmarks, cross-dissolved by the face degree and blended through a Laplacian pyramid.

One definition serves ONNX export (and so TensorRT), PyTorch on CUDA and the tests. Tensor ops only
(convolutions, pooling, resize, grid sampling, element-wise math), all in TensorRT's ONNX parser; the small
spline solves happen in preprocess (facefuse.geometry).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facefuse.alignment import CROP_SIZE
from facefuse.geometry import CONTROL_COUNT, OUTLINE_POINTS, fusion_geometry, synthetic_mesh, tps_kernel

# The geometry preprocess computes for each request, packed into one float32 row (GEOMETRY) in this order: one tensor
# handed from preprocess to the network instead of six, each of which costs the Python backend its own hand-over.
GEOMETRY_PARTS: dict[str, tuple[int, ...]] = {
    "CONTROL_POINTS": (CONTROL_COUNT, 2),
    "WARP_COEFFICIENTS": (CONTROL_COUNT + 3, 4),
    "FUSED_OUTLINE": (OUTLINE_POINTS, 2),
    "TARGET_OUTLINE": (OUTLINE_POINTS, 2),
    "FACE_DEGREE": (1,),
    "PROFILE_DEGREE": (1,),
}
_GEOMETRY_ENDS = np.cumsum([int(np.prod(shape)) for shape in GEOMETRY_PARTS.values()]).tolist()
_GEOMETRY_SLICES = dict(zip(GEOMETRY_PARTS, zip([0, *_GEOMETRY_ENDS[:-1]], _GEOMETRY_ENDS)))  # name -> (start, end)
GEOMETRY_SIZE = _GEOMETRY_ENDS[-1]
# Per-request shapes (without the batch axis); the Triton configs and the TensorRT profiles follow these. CROPS holds
# the aligned source crop, then the target crop.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "CROPS": (2, 3, CROP_SIZE, CROP_SIZE),
    "GEOMETRY": (GEOMETRY_SIZE,),
}
OUTPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "FUSED_CROP": (3, CROP_SIZE, CROP_SIZE),
    "BLEND_MASK": (1, CROP_SIZE, CROP_SIZE),
}
INPUT_NAMES = tuple(INPUT_SHAPES)
# In an FP16 network only the pixels are FP16; the geometry (spline points and coefficients, outlines) and the
# degrees stay FP32 (see FusionNetwork._sampling_grids).
PIXEL_INPUTS = ("CROPS",)
OUTPUT_NAMES = tuple(OUTPUT_SHAPES)
VERSION = "fusion-v2"
WARP_GRID = 64  # splines are evaluated on a 64x64 grid and upsampled: the warp is smooth


def input_dtype(name: str, pixel_dtype: torch.dtype) -> torch.dtype:
    """The dtype the network takes input ``name`` in, when its pixels are ``pixel_dtype``."""
    return pixel_dtype if name in PIXEL_INPUTS else torch.float32


def pack_geometry(parts: Mapping[str, Any]) -> Any:
    """GEOMETRY_PARTS' arrays (B, *shape), all numpy or all torch, as one (B, GEOMETRY_SIZE) float32 batch of the
    same kind."""
    rows = [parts[name].reshape(len(parts[name]), -1) for name in GEOMETRY_PARTS]
    if isinstance(rows[0], torch.Tensor):
        return torch.cat([row.float() for row in rows], dim=1)
    return np.concatenate(rows, axis=1).astype(np.float32, copy=False)


def unpack_geometry(geometry: torch.Tensor) -> dict[str, torch.Tensor]:
    """The (B, GEOMETRY_SIZE) batch back as GEOMETRY_PARTS' (B, *shape) views (slices and reshapes: in the ONNX graph
    too)."""
    return {name: geometry[:, start:end].reshape(-1, *GEOMETRY_PARTS[name])
            for name, (start, end) in _GEOMETRY_SLICES.items()}


def polygon_distance(outline: torch.Tensor, grid_x: torch.Tensor, grid_y: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, > 0 inside) from every grid point to a convex polygon (B,P,2), as (B,1,H,W):
    the smallest distance to the lines of its edges, oriented by the polygon's winding.

    Each edge's distance is a linear function a*x + b*y + c of the point, so all edges at all points are one
    matrix product, laid out (B, P, H*W) so that the minimum runs across rows (on the H200 the minimum over a
    short last axis took 110 us at batch 32)."""
    following = torch.roll(outline, shifts=-1, dims=1)
    edge = following - outline
    length = torch.sqrt((edge**2).sum(-1) + 1e-6)
    winding = torch.sign((outline[..., 0] * following[..., 1] - following[..., 0] * outline[..., 1]).sum(1))
    # cross(edge, point - start) / |edge| = (-ey) x + ex y + (ey sx - ex sy), all over |edge|, times the winding.
    ex, ey = edge[..., 0] / length, edge[..., 1] / length
    sx, sy = outline[..., 0], outline[..., 1]
    lines = torch.stack([-ey, ex, ey * sx - ex * sy], dim=2) * winding[:, None, None]  # (B,P,3)
    height, width = grid_x.shape[-2:]
    points = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1), torch.ones_like(grid_x.reshape(-1))], dim=0)
    distance = torch.matmul(lines, points)  # (B, P, H*W)
    return torch.amin(distance, dim=1).reshape(-1, 1, height, width)


class LaplacianBlend(nn.Module):
    """Multi-band blend: adds `detail` to a base image band by band, each band weighted by the mask
    blurred to that band's scale, so low frequencies blend over wide zones and fine detail over narrow ones."""

    def __init__(self, levels: int = 5) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        kernel = torch.outer(taps, taps) / 256.0
        self.register_buffer("kernel3", kernel.expand(3, 1, 5, 5).clone(), persistent=False)
        self.register_buffer("kernel1", kernel.expand(1, 1, 5, 5).clone(), persistent=False)
        self.levels = levels

    @staticmethod
    def _down(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """Blur with the 5-tap binomial kernel, then halve."""
        blurred = F.conv2d(F.pad(image, (2, 2, 2, 2), mode="replicate"), kernel, groups=kernel.shape[0])
        return F.avg_pool2d(blurred, 2)

    @staticmethod
    def _up(image: torch.Tensor) -> torch.Tensor:
        return F.interpolate(image, scale_factor=2.0, mode="bilinear", align_corners=False)

    def forward(self, base: torch.Tensor, detail: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        detail_levels = [detail]
        mask_levels = [mask]
        for _ in range(self.levels - 1):
            detail_levels.append(self._down(detail_levels[-1], self.kernel3))
            mask_levels.append(self._down(mask_levels[-1], self.kernel1))
        blended = detail_levels[-1] * mask_levels[-1]
        for level in range(self.levels - 2, -1, -1):
            band = detail_levels[level] - self._up(detail_levels[level + 1])
            blended = self._up(blended) + band * mask_levels[level]
        return base + blended


# RGB <-> YCbCr (full range, offsets dropped: only means and spreads are moved, so they cancel).
_RGB_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCBCR_TO_RGB = torch.linalg.inv(_RGB_TO_YCBCR)
# Luma keeps at least half its contrast (texture); chroma may shrink to nothing (a grayscale target).
_MIN_GAIN = torch.tensor([0.5, 0.0, 0.0]).view(1, 3, 1, 1)
_MAX_GAIN = 2.0


def colour_match_buffers(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The colour-match constants as 1x1 convolution weights and gain bounds, on `like`'s device and dtype."""
    return (_RGB_TO_YCBCR.to(like)[:, :, None, None], _YCBCR_TO_RGB.to(like)[:, :, None, None], _MIN_GAIN.to(like))


def masked_colour_match(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                        colour_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Move the source's per-channel mean and spread inside the mask to the target's, in YCbCr.

    `colour_buffers` (to YCbCr, to RGB, minimum gains) lets a module pass its own device-resident copies."""
    if colour_buffers is None:
        colour_buffers = colour_match_buffers(source)
    to_ycbcr, to_rgb, min_gain = colour_buffers
    source_ycc, target_ycc = F.conv2d(source, to_ycbcr), F.conv2d(target, to_ycbcr)
    total = weights.sum(dim=(2, 3), keepdim=True) + 1e-6
    source_mean = (source_ycc * weights).sum(dim=(2, 3), keepdim=True) / total
    target_mean = (target_ycc * weights).sum(dim=(2, 3), keepdim=True) / total
    source_var = ((source_ycc - source_mean) ** 2 * weights).sum(dim=(2, 3), keepdim=True) / total
    target_var = ((target_ycc - target_mean) ** 2 * weights).sum(dim=(2, 3), keepdim=True) / total
    # Bounded gain: a dark or washed-out source must not blow up noise.
    gain = torch.sqrt((target_var + 1e-6) / (source_var + 1e-6))
    gain = torch.minimum(torch.maximum(gain, min_gain), torch.full_like(gain, _MAX_GAIN))
    matched = F.conv2d((source_ycc - source_mean) * gain + target_mean, to_rgb)
    return torch.clamp(matched, 0.0, 1.0)


class FusionNetwork(nn.Module):
    """``fuse``'s inputs (batch first; ``forward`` takes them packed, INPUT_SHAPES): the aligned crops (3,S,S) in
    [0,1]; the spline control points (K,2) of the intermediate shape and coefficients (K+3,4) mapping it to target
    (x,y) and source (x,y) crop pixels; the brows-to-chin outlines (P,2) of the intermediate and the target face; the
    degrees (1) in 0..100.
    Outputs: the fused crop (3,S,S) and the paste-back mask (1,S,S) of the region that changed."""

    def __init__(self, crop_size: int = CROP_SIZE, pyramid_levels: int = 5, warp_grid: int = WARP_GRID) -> None:
        super().__init__()
        self.crop_size = crop_size
        self.blend = LaplacianBlend(pyramid_levels)
        for name, value in zip(("to_ycbcr", "to_rgb", "min_gain"), colour_match_buffers(torch.zeros(1))):
            self.register_buffer(name, value, persistent=False)
        pixels = torch.arange(crop_size, dtype=torch.float32)  # pixel centres at integers, as OpenCV warps
        grid_y, grid_x = torch.meshgrid(pixels, pixels, indexing="ij")
        self.register_buffer("grid_x", grid_x[None, None], persistent=False)
        self.register_buffer("grid_y", grid_y[None, None], persistent=False)
        # Coarse points on the first and last pixel centres, so corner-aligned upsampling reproduces any affine
        # map exactly, borders included.
        coarse = torch.linspace(0.0, crop_size - 1.0, warp_grid)
        coarse_y, coarse_x = torch.meshgrid(coarse, coarse, indexing="ij")
        # (1, G*G, 2) in the unit-crop coordinates the splines were fitted in.
        self.register_buffer("coarse_points", torch.stack([coarse_x, coarse_y], -1).reshape(1, -1, 2) / crop_size,
                             persistent=False)
        self.warp_grid = warp_grid
        edge = torch.clamp((torch.arange(crop_size, dtype=torch.float32) + 0.5) / 8.0, 0.0, 1.0)
        edge = torch.minimum(edge, edge.flip(0))
        # Outline distances are piecewise linear: computed at half resolution and upsampled, at a quarter the cost.
        half = torch.arange(crop_size // 2, dtype=torch.float32) * 2.0 + 0.5
        half_y, half_x = torch.meshgrid(half, half, indexing="ij")
        self.register_buffer("half_x", half_x[None, None], persistent=False)
        self.register_buffer("half_y", half_y[None, None], persistent=False)
        # Keep the paste-back off the crop border, where warping had to invent pixels.
        self.register_buffer("border_fade", (edge[:, None] * edge[None, :])[None, None], persistent=False)

    # The spline's coordinate grids stay FP32 when the module moves to FP16 (`.half()`, `.to(dtype)`): the warp is
    # computed in FP32 (see _sampling_grids); the pixels and the masks take the module's precision.
    GEOMETRY_BUFFERS = ("grid_x", "grid_y", "coarse_points")

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        geometry = {name: getattr(self, name) for name in self.GEOMETRY_BUFFERS}
        super()._apply(fn, recurse)
        for name, original in geometry.items():
            self._buffers[name] = original.to(self._buffers[name].device)
        return self

    def _sampling_grids(self, control_points: torch.Tensor, coefficients: torch.Tensor,
                        pixel_dtype: torch.dtype) -> torch.Tensor:
        """Evaluate both splines on the coarse grid and upsample: (B,4,S,S) = target x,y and source x,y as
        grid_sample coordinates (-1..1), in ``pixel_dtype``.

        The splines are evaluated in FP32 whatever the pixels' precision: sums of r^2 log r terms times coefficients
        in the hundreds lose pixels in FP16 (H200, batch 32, random crops: the FP16 network's fused crop was off the
        FP32 one by 0.16 on average). The -1..1 coordinates then lose 0.11 px at most to FP16 (measured)."""
        centres = control_points.float() / self.crop_size
        coefficients = coefficients.float()
        points = self.coarse_points  # (1, G*G, 2)
        # Squared distances by broadcasting, not |p|^2 + |c|^2 - 2 p.c, which cancels badly near the control points.
        offset_x = points[..., 0:1] - centres[:, None, :, 0]
        offset_y = points[..., 1:2] - centres[:, None, :, 1]
        kernel = tps_kernel(offset_x * offset_x + offset_y * offset_y)  # (B, G*G, K)
        count = control_points.shape[1]
        mapped = (torch.matmul(kernel, coefficients[:, :count]) + coefficients[:, count:count + 1]
                  + points[..., 0:1] * coefficients[:, count + 1:count + 2]
                  + points[..., 1:2] * coefficients[:, count + 2:count + 3])  # (B, G*G, 4) in crop pixels
        # Pixel centres at integers -> grid_sample's -1..1 (align_corners=False): linear, so it commutes with the
        # upsampling.
        normalised = (mapped + 0.5) * (2.0 / self.crop_size) - 1.0
        normalised = normalised.transpose(1, 2).reshape(-1, 4, self.warp_grid, self.warp_grid).to(pixel_dtype)
        return F.interpolate(normalised, size=(self.crop_size, self.crop_size), mode="bilinear", align_corners=True)

    def _outline_distance(self, outline: torch.Tensor) -> torch.Tensor:
        """Signed distance to an outline (B,P,2) at full resolution, in the half grid's dtype (the module's: FP16
        resolves 0.25 px at the crop's far side, plenty for masks feathered over 10 px and more)."""
        distance = polygon_distance(outline.to(self.half_x.dtype), self.half_x, self.half_y)
        return F.interpolate(distance, scale_factor=2.0, mode="bilinear", align_corners=False)

    @staticmethod
    def _sample(image: torch.Tensor, grid_x: torch.Tensor, grid_y: torch.Tensor) -> torch.Tensor:
        grid = torch.stack([grid_x, grid_y], dim=-1)
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, crops: torch.Tensor, geometry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The served signature: CROPS (B,2,3,S,S), the source's crop then the target's, and GEOMETRY
        (B, GEOMETRY_SIZE), GEOMETRY_PARTS packed (pack_geometry)."""
        parts = unpack_geometry(geometry)
        return self.fuse(crops[:, 0], crops[:, 1], *(parts[name] for name in GEOMETRY_PARTS))

    def fuse(
        self,
        source_crop: torch.Tensor,
        target_crop: torch.Tensor,
        control_points: torch.Tensor,
        warp_coefficients: torch.Tensor,
        fused_outline: torch.Tensor,
        target_outline: torch.Tensor,
        face_degree: torch.Tensor,
        profile_degree: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_dtype = target_crop.dtype
        alpha = (torch.clamp(face_degree, 0.0, 100.0)[:, :, None, None] / 100.0).to(pixel_dtype)
        profile = (torch.clamp(profile_degree, 0.0, 100.0)[:, :, None, None] / 100.0).to(pixel_dtype)
        grids = self._sampling_grids(control_points, warp_coefficients, pixel_dtype)
        target_warped = self._sample(target_crop, grids[:, 0], grids[:, 1])
        source_warped = self._sample(source_crop, grids[:, 2], grids[:, 3])
        face_width = (fused_outline[..., 0].amax(1) - fused_outline[..., 0].amin(1))[:, None, None, None]
        feather = (0.07 * face_width).to(pixel_dtype)
        fused_distance = self._outline_distance(fused_outline)
        face_mask = _smoothstep_tensor(torch.zeros_like(feather), feather, fused_distance)
        core = _smoothstep_tensor(feather, 2.0 * feather, fused_distance)
        matched_source = masked_colour_match(source_warped, target_warped, core,
                                             (self.to_ycbcr, self.to_rgb, self.min_gain))
        detail = alpha * (matched_source - target_warped)
        fused = torch.clamp(self.blend(target_warped, detail, face_mask), 0.0, 1.0)
        # What changed: the union of both outlines, grown by the pyramid's and the warp's reach.
        union = torch.maximum(fused_distance, self._outline_distance(target_outline))
        reach = (0.25 * face_width).to(pixel_dtype)
        paste_mask = _smoothstep_tensor(-reach, -0.3 * reach, union) * self.border_fade
        paste_mask = paste_mask * torch.clamp((alpha + profile) * 50.0, 0.0, 1.0)
        return fused, paste_mask


def _smoothstep_tensor(edge0: torch.Tensor, edge1: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    t = torch.clamp((value - edge0) / (edge1 - edge0 + 1e-6), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def example_parts(batch: int = 2, seed: int = 0, smooth: bool = False) -> tuple[torch.Tensor, ...]:
    """Plausible inputs of ``FusionNetwork.fuse``: random crops, geometry from jittered synthetic meshes, degrees
    across 0..100.

    ``smooth``: photo-like crops (noise at 1/16 resolution, upsampled), for comparing warps: on pixel noise any
    sub-pixel difference in where a pixel is sampled from is a large difference in its value."""
    generator = torch.Generator().manual_seed(seed)
    source_crop = torch.rand(batch, 3, CROP_SIZE, CROP_SIZE, generator=generator)
    target_crop = torch.rand(batch, 3, CROP_SIZE, CROP_SIZE, generator=generator)
    if smooth:
        source_crop, target_crop = (F.interpolate(crop[..., ::16, ::16], size=(CROP_SIZE, CROP_SIZE), mode="bicubic",
                                                  align_corners=False).clamp(0.0, 1.0)
                                    for crop in (source_crop, target_crop))
    face_degree = torch.linspace(0.0, 100.0, batch)[:, None]
    profile_degree = torch.linspace(100.0, 0.0, batch)[:, None]
    geometries = [fusion_geometry(synthetic_mesh(seed * 1000 + 2 * row), synthetic_mesh(seed * 1000 + 2 * row + 1),
                                  float(profile_degree[row])) for row in range(batch)]
    stacked = {name: torch.from_numpy(np.stack([g[name] for g in geometries]))
               for name in ("CONTROL_POINTS", "WARP_COEFFICIENTS", "FUSED_OUTLINE", "TARGET_OUTLINE")}
    return (source_crop, target_crop, stacked["CONTROL_POINTS"], stacked["WARP_COEFFICIENTS"],
            stacked["FUSED_OUTLINE"], stacked["TARGET_OUTLINE"], face_degree, profile_degree)


def pack_inputs(*parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fuse``'s eight inputs as ``forward``'s two (CROPS, GEOMETRY)."""
    source_crop, target_crop, *geometry = parts
    return torch.stack([source_crop, target_crop], dim=1), pack_geometry(dict(zip(GEOMETRY_PARTS, geometry)))


def example_inputs(batch: int = 2, seed: int = 0, smooth: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``example_parts`` packed as the network's inputs (INPUT_NAMES' order)."""
    return pack_inputs(*example_parts(batch, seed, smooth))

"""Fusion network v1: colour-matched cross-dissolve of the aligned source face into the target crop,
blended through a Laplacian pyramid so no seam shows.

One definition serves ONNX export (and so TensorRT), PyTorch on CUDA and the tests. Tensor ops only:
depthwise convolutions, pooling, bilinear resize and element-wise math, all in TensorRT's ONNX parser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facefuse.alignment import CROP_SIZE

INPUT_NAMES = ("SOURCE_CROP", "TARGET_CROP", "SOURCE_LANDMARKS", "TARGET_LANDMARKS", "FACE_DEGREE", "PROFILE_DEGREE")
OUTPUT_NAMES = ("FUSED_CROP", "BLEND_MASK")
VERSION = "fusion-v1"


def _smoothstep(edge0: float, edge1: float, value: torch.Tensor) -> torch.Tensor:
    t = torch.clamp((value - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class FaceEllipseMask(nn.Module):
    """Soft elliptical face mask (brows to chin, cheek to cheek) placed by 5 landmarks in crop pixels."""

    def __init__(self, crop_size: int = CROP_SIZE) -> None:
        super().__init__()
        coords = torch.arange(crop_size, dtype=torch.float32) + 0.5
        grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
        self.register_buffer("grid_x", grid_x[None, None], persistent=False)
        self.register_buffer("grid_y", grid_y[None, None], persistent=False)

    def normalised_radius(self, landmarks: torch.Tensor, scale: float) -> torch.Tensor:
        """(B,5,2) landmarks -> (B,1,H,W) elliptical radius, 1.0 on the face outline times `scale`."""
        eyes = 0.5 * (landmarks[:, 0] + landmarks[:, 1])
        mouth = 0.5 * (landmarks[:, 3] + landmarks[:, 4])
        eye_vector = landmarks[:, 1] - landmarks[:, 0]
        eye_distance = torch.sqrt((eye_vector**2).sum(-1) + 1e-6)
        down = mouth - eyes
        eye_mouth = torch.sqrt((down**2).sum(-1) + 1e-6)
        cos = (eye_vector[:, 0] / eye_distance)[:, None, None, None]
        sin = (eye_vector[:, 1] / eye_distance)[:, None, None, None]
        # Centre a little below the eye-mouth midpoint: the chin reaches further than the brows.
        centre = eyes + down * 0.55
        half_width = (0.95 * eye_distance * scale)[:, None, None, None]
        half_height = (1.12 * eye_mouth * scale)[:, None, None, None]
        dx = self.grid_x - centre[:, 0, None, None, None]
        dy = self.grid_y - centre[:, 1, None, None, None]
        along = (dx * cos + dy * sin) / half_width
        across = (-dx * sin + dy * cos) / half_height
        return torch.sqrt(along * along + across * across + 1e-8)

    def forward(self, landmarks: torch.Tensor, scale: float = 1.0, feather: float = 0.25) -> torch.Tensor:
        radius = self.normalised_radius(landmarks, scale)
        return 1.0 - _smoothstep(1.0 - feather, 1.0, radius)


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


def masked_colour_match(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Move the source's per-channel mean and spread inside the mask to the target's, in YCbCr."""
    to_ycbcr = _RGB_TO_YCBCR.to(source)[:, :, None, None]
    to_rgb = _YCBCR_TO_RGB.to(source)[:, :, None, None]
    source_ycc, target_ycc = F.conv2d(source, to_ycbcr), F.conv2d(target, to_ycbcr)
    total = weights.sum(dim=(2, 3), keepdim=True) + 1e-6
    source_mean = (source_ycc * weights).sum(dim=(2, 3), keepdim=True) / total
    target_mean = (target_ycc * weights).sum(dim=(2, 3), keepdim=True) / total
    source_var = ((source_ycc - source_mean) ** 2 * weights).sum(dim=(2, 3), keepdim=True) / total
    target_var = ((target_ycc - target_mean) ** 2 * weights).sum(dim=(2, 3), keepdim=True) / total
    # Bounded gain: a dark or washed-out source must not blow up noise.
    gain = torch.sqrt((target_var + 1e-6) / (source_var + 1e-6))
    gain = torch.minimum(torch.maximum(gain, _MIN_GAIN.to(source)), torch.full_like(gain, _MAX_GAIN))
    matched = F.conv2d((source_ycc - source_mean) * gain + target_mean, to_rgb)
    return torch.clamp(matched, 0.0, 1.0)


class FusionNetwork(nn.Module):
    """Inputs: aligned crops (B,3,H,W) in [0,1], their 5 landmarks in crop pixels (B,5,2), degrees (B,1) in 0..100.
    Outputs: the fused crop (B,3,H,W) and the paste-back mask (B,1,H,W) of the region that changed."""

    def __init__(self, crop_size: int = CROP_SIZE, pyramid_levels: int = 5) -> None:
        super().__init__()
        self.face_mask = FaceEllipseMask(crop_size)
        self.blend = LaplacianBlend(pyramid_levels)
        edge = torch.clamp((torch.arange(crop_size, dtype=torch.float32) + 0.5) / 8.0, 0.0, 1.0)
        edge = torch.minimum(edge, edge.flip(0))
        # Keep the paste-back off the crop border, where warping had to invent pixels.
        self.register_buffer("border_fade", (edge[:, None] * edge[None, :])[None, None], persistent=False)

    def forward(
        self,
        source_crop: torch.Tensor,
        target_crop: torch.Tensor,
        source_landmarks: torch.Tensor,
        target_landmarks: torch.Tensor,
        face_degree: torch.Tensor,
        profile_degree: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = torch.clamp(face_degree, 0.0, 100.0)[:, :, None, None] / 100.0
        profile = torch.clamp(profile_degree, 0.0, 100.0)[:, :, None] / 100.0
        # v1 moves no pixels; the profile degree only shapes the mask between the two outlines.
        mask_landmarks = target_landmarks + profile * (source_landmarks - target_landmarks)
        face_mask = torch.minimum(self.face_mask(mask_landmarks), self.face_mask(target_landmarks, scale=1.05))
        core = self.face_mask(target_landmarks, scale=0.85, feather=0.1)
        matched_source = masked_colour_match(source_crop, target_crop, core * self.face_mask(source_landmarks, 0.85))
        detail = alpha * (matched_source - target_crop)
        fused = torch.clamp(self.blend(target_crop, detail, face_mask), 0.0, 1.0)
        # The pyramid spreads change a little past the face mask; the paste mask covers that reach.
        reach = self.face_mask(target_landmarks, scale=1.45, feather=0.3)
        paste_mask = reach * self.border_fade * torch.clamp(alpha * 50.0, 0.0, 1.0)
        return fused, paste_mask

"""MTCNN face detection (P-Net -> R-Net -> O-Net cascade) with 5-point landmarks.

The network definitions are our own; only the pretrained weights come from the ``facenet-pytorch`` wheel, whose
``data/{pnet,rnet,onet}.pt`` are plain state dicts. ``facenet_pytorch`` itself is never imported because its
``__init__`` imports torchvision, which must not be installed beside this torch.

Two image paths, one algorithm. On the CPU the pyramid and the R-/O-Net crops are made with OpenCV/numpy (fastest
there). On CUDA (or when asked for, e.g. by the parity tests) they are made on the device: images of one size are
batched, with one pyramid (``F.interpolate``) and one P-Net pass per level for the batch, every R-/O-Net crop comes
from one gather (grid_sample's bilinear sampling), and P-Net's candidates of a whole call reach the host in one
copy; only the small box arrays and the NMS stay on the host. The NMS runs for all images and levels at once
(``nms_grouped``; P-Net's windows through their grid neighbours, ``_grid_nms``), with the textbook result. The two
paths agree to about a pixel (OpenCV's fixed-point bilinear vs float); each is deterministic for a given device.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facefuse import triton_kernels
from facefuse.batch_buckets import BucketedNet, bucket_sizes, forward_in_bucket
from facefuse.device_imaging import to_device, to_host

_PYRAMID_FACTOR = 0.709
# Where candidate faces come from: P-Net's pyramid, or BlazeFace; "auto" = BlazeFace, on the host path (the CPU's
# detector, where it makes detection ~3x cheaper) and on the device path (the GPU's).
PROPOSAL_CHOICES = ("auto", "mtcnn", "blazeface")
# BlazeFace's own score only nominates candidates; R-Net and O-Net decide. On 16 benchmark photos (1080p views of the
# group photo) 0.5 lost 15 of the 96 faces the full cascade finds with score > 0.95, 0.3 lost 3, 0.15 none.
_BLAZEFACE_MIN_SCORE = 0.15
_BLAZEFACE_GROWTH = 1.2
_PNET_CELL = 12  # P-Net's receptive field: one output cell sees a 12x12 window ...
_PNET_STRIDE = 2  # ... and neighbouring cells are 2 input pixels apart.
_NMS_PNET_SCALE = 0.5
_NMS_PNET_ALL = 0.7
_NMS_RNET = 0.7
_NMS_ONET = 0.7
_MAX_BATCH = 2048  # crops per R-/O-Net forward on GPU; bounds memory when a noisy image yields many proposals
# CPU only: input pixels per forward, sized so the first layer's activations stay in cache (measured 1.5-2x faster
# than one big pass on a 2-core EPYC): P-Net runs in horizontal strips, R-/O-Net in sub-batches.
_CPU_PNET_PIXELS = 1 << 17
_CPU_CROP_PIXELS = 1 << 16
_MAX_PNET_PIXELS = 1 << 24  # device: working-image pixels per batched P-Net pass (~0.7 GB of first-layer activations)
_MAX_DEVICE_PIXELS = 1 << 27  # device: decoded pixels made float at once (1.5 GB)
_NMS_MAX_PAIRS = 1 << 22  # candidate pairs the vectorised NMS may materialise (~200 MiB of temporaries at most)


def _weights_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("facenet-pytorch is not installed; it provides the pretrained MTCNN weights")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data"


def _flatten_caffe(x: torch.Tensor) -> torch.Tensor:
    # The dense layers were trained on Caffe blobs flattened in (W, H, C) order; permuting NCHW -> NWHC before
    # flattening lets the stored weights be used unchanged on normally oriented images.
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal net: fully convolutional, one face score + box offset per 12x12 window (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,3,H,W) normalised -> (face probability (N,H',W'), box offsets (N,4,H',W'))."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        prob = torch.softmax(self.conv4_1(x), dim=1)[:, 1]
        return prob, self.conv4_2(x)


class RNet(nn.Module):
    """Refine net: 24x24 crops -> face probability + box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,3,24,24) normalised -> (face probability (N,), box offsets (N,4))."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_caffe(x)))
        prob = torch.softmax(self.dense5_1(x), dim=1)[:, 1]
        return prob, self.dense5_2(x)


class ONet(nn.Module):
    """Output net: 48x48 crops -> face probability + box offsets + 5 landmarks (x1..x5, y1..y5 in box units)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N,3,48,48) normalised -> (face probability (N,), box offsets (N,4), landmarks (N,10))."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_caffe(x)))
        prob = torch.softmax(self.dense6_1(x), dim=1)[:, 1]
        return prob, self.dense6_2(x), self.dense6_3(x)


def _load(net: nn.Module, name: str, device: torch.device) -> nn.Module:
    state = torch.load(_weights_dir() / f"{name}.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    net.requires_grad_(False)
    return net.eval().to(device)


@dataclass(frozen=True)
class DetectedFace:
    """One face in input-image pixel coordinates (boxes are not clipped to the image)."""

    box: np.ndarray  # (4,) float32 x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # (5, 2) float32 (x, y) in ArcFace order: eye, eye, nose, mouth, mouth (each pair by x)

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.box)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def to_json(self) -> dict:
        return {
            # tolist: Python floats in one call (a float() per numpy scalar cost ~30 us per face)
            "box": [round(value, 1) for value in self.box.tolist()],
            "score": round(float(self.score), 4),
            "landmarks": [[round(x, 1), round(y, 1)] for x, y in self.landmarks.tolist()],
        }


def box_overlap(box: np.ndarray, area: np.ndarray | float, boxes: np.ndarray, areas: np.ndarray,
             mode: str) -> np.ndarray:
    """IoU (or intersection / smaller area for ``mode="min"``) of ``box`` rows against ``boxes`` (broadcasting)."""
    iw = np.maximum(np.minimum(box[..., 2], boxes[..., 2]) - np.maximum(box[..., 0], boxes[..., 0]), 0.0)
    ih = np.maximum(np.minimum(box[..., 3], boxes[..., 3]) - np.maximum(box[..., 1], boxes[..., 1]), 0.0)
    inter = iw * ih
    denom = np.minimum(area, areas) if mode == "min" else area + areas - inter
    return inter / np.maximum(denom, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best score first.

    ``mode="min"`` divides the intersection by the smaller area, which also removes a small box nested in a large
    one (the last MTCNN stage uses it so a face is not reported twice at two sizes).
    """
    return nms_grouped(boxes, scores, np.zeros(len(boxes), dtype=np.int64), threshold, mode)


def nms_grouped(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float,
                mode: str = "union") -> np.ndarray:
    """``nms`` within each group (e.g. one image, or one pyramid level of one image) in one vectorised pass.

    Returns the kept indices ordered by group, then best score first (ties keep input order): exactly the
    concatenation of ``nms`` run on each group in increasing group order, without a call per group.
    """
    if mode not in ("union", "min"):
        raise ValueError(f"unknown NMS mode {mode!r}")
    if not 0.0 <= threshold <= 1.0:  # >= 0 also makes skipping non-intersecting pairs exact
        raise ValueError(f"NMS threshold must be in [0, 1], got {threshold}")
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    order = np.lexsort((-np.asarray(scores, dtype=np.float64), groups))  # stable: ties resolve the same every run
    boxes = np.asarray(boxes, dtype=np.float64)[order]
    groups = groups[order]
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0.0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0.0)
    keep = _greedy_sparse(boxes, areas, threshold, mode, groups)
    if keep is None:  # too many candidate pairs: the reference loop, group by group
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        ends = np.r_[starts[1:], len(groups)]
        keep = np.concatenate([start + _greedy_loop(boxes[start:end], areas[start:end], threshold, mode)
                               for start, end in zip(starts, ends)])
    return order[keep]


def _greedy_sparse(boxes: np.ndarray, areas: np.ndarray, threshold: float, mode: str,
                   groups: np.ndarray | None = None) -> np.ndarray | None:
    """Greedy NMS over boxes sorted best first (by group, then best first, when ``groups`` is given), comparing
    only pairs of one group that overlap along x.

    P-Net yields hundreds to thousands of small proposals per image spread over it; an all-pairs overlap is then
    mostly zeros and costs tens of ms, so candidate pairs come from a sweep over x1 instead, all vectorised, and
    only the final greedy pass is a Python loop. None when the pairs would be too many (then use the plain loop).
    """
    n = len(boxes)
    if groups is None:
        groups = np.zeros(n, dtype=np.int64)
    widths = boxes[:, 2] - boxes[:, 0]
    _, group_index = np.unique(groups, return_inverse=True)
    widest = np.zeros(group_index.max() + 1)
    np.maximum.at(widest, group_index, widths)  # per group: a level of tiny windows keeps a narrow sweep
    # Sweep key: x1, with each group shifted past the previous one by more than any box reaches, so a window
    # around one box never reaches into another group. The window is widened by a pixel to absorb rounding of
    # the shifted keys; extra candidates are harmless (their overlap is computed from the true boxes).
    span = float(np.max(boxes[:, 2]) - np.min(boxes[:, 0])) + 2.0 * float(widest.max()) + 4.0
    offset = group_index * span
    key = boxes[:, 0] + offset
    by_x = np.argsort(key, kind="stable")
    key_sorted = key[by_x]
    # Box j can only intersect box i if x1_i - widest < x1_j < x2_i; every other pair has zero overlap.
    lo = np.searchsorted(key_sorted, key - widest[group_index] - 1.0, side="left")
    hi = np.searchsorted(key_sorted, boxes[:, 2] + offset + 1.0, side="right")
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    if total > _NMS_MAX_PAIRS:
        return None
    first = np.repeat(np.arange(n), counts)
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    second = by_x[np.repeat(lo, counts) + within]
    # A box can only be suppressed by a better-scored one of its own group (groups are contiguous in this order).
    later = (second > first) & (groups[second] == groups[first])
    first, second = first[later], second[later]
    hit = box_overlap(boxes[first], areas[first], boxes[second], areas[second], mode) > threshold
    return _greedy_from_pairs(n, first[hit], second[hit])


_GREEDY_ROUNDS = 64  # vectorised rounds of _greedy_from_pairs before it finishes box by box


def _greedy_from_pairs(n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The greedy pass of NMS over ``n`` boxes in processing order, given every pair (first < second, ``first``
    sorted) whose overlap exceeds the threshold: a box is kept unless a kept earlier box hits it.

    Decided in vectorised rounds rather than box by box (thousands of P-Net windows per batch): a box hit by a kept
    box is suppressed; a box whose hitters are all decided and none kept is kept. The earliest undecided box always
    has only decided hitters, so every round decides at least one box and the result is exactly the sequential
    one; a round costs one pass over the pairs still open, and chains of overlapping windows are short. Past
    _GREEDY_ROUNDS rounds (pathological chains) the rest is finished box by box.
    """
    undecided, kept, suppressed = 0, 1, 2
    state = np.zeros(n, dtype=np.int8)
    for _ in range(_GREEDY_ROUNDS):
        state[second[state[first] == kept]] = suppressed  # (kept boxes never have kept hitters)
        open_pairs = state[second] == undecided
        first, second = first[open_pairs], second[open_pairs]
        blocked = np.zeros(n, dtype=bool)
        blocked[second[state[first] == undecided]] = True
        newly_kept = (state == undecided) & ~blocked
        state[newly_kept] = kept
        if not (state == undecided).any():
            return np.flatnonzero(state == kept)
    state[second[state[first] == kept]] = suppressed
    starts = np.searchsorted(first, np.arange(n + 1))  # ``first`` is still sorted: CSR rows of hit boxes
    for i in np.flatnonzero(state == undecided):
        if state[i] == undecided:
            state[i] = kept
            state[second[starts[i]:starts[i + 1]]] = suppressed  # later boxes only: none of them is kept yet
    return np.flatnonzero(state == kept)


def _greedy_from_pairs_loop(n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``_greedy_from_pairs`` box by box: the reference the tests hold it to."""
    starts = np.searchsorted(first, np.arange(n + 1))
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if not suppressed[i]:
            keep.append(i)
            suppressed[second[starts[i]:starts[i + 1]]] = True
    return np.asarray(keep, dtype=np.int64)


def _greedy_loop(boxes: np.ndarray, areas: np.ndarray, threshold: float, mode: str) -> np.ndarray:
    # Reference algorithm, O(n) memory: the fallback when boxes are so large or many that pairs would explode.
    remaining = np.arange(len(boxes))
    keep = []
    while remaining.size:
        i, rest = remaining[0], remaining[1:]
        keep.append(i)
        remaining = rest[box_overlap(boxes[i], areas[i], boxes[rest], areas[rest], mode) <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _nms_per_image(boxes: np.ndarray, scores: np.ndarray, image_ids: np.ndarray, threshold: float,
                   mode: str = "union") -> np.ndarray:
    return np.sort(nms_grouped(boxes, scores, image_ids, threshold, mode))


def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    wh = np.concatenate([boxes[:, 2:4] - boxes[:, 0:2]] * 2, axis=1)
    return boxes + offsets * wh


def _square(boxes: np.ndarray) -> np.ndarray:
    # R-/O-Net take square crops; grow the short side around the centre so the face keeps its aspect ratio.
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
    cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
    return np.stack([cx - side * 0.5, cy - side * 0.5, cx + side * 0.5, cy + side * 0.5], axis=1)


def _shrink(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to ``size`` (w, h) for the pyramid.

    The 0.709 steps between pyramid levels use bilinear: ~5x cheaper than INTER_AREA and, at so mild a shrink,
    nearly alias-free. Stronger reductions (the max_side cap, the first level) average with INTER_AREA.
    """
    ratio = min(size[0] / image.shape[1], size[1] / image.shape[0])
    interpolation = cv2.INTER_LINEAR if ratio > 0.7 else cv2.INTER_AREA
    return cv2.resize(image, size, interpolation=interpolation)


@dataclass
class _Pyramid:
    """One image at several scales: the working image first (scale 1), then each P-Net level, shrinking."""

    levels: list[np.ndarray]
    scales: list[tuple[float, float]]  # (x, y) ratio level / working image, exact for the rounded level size
    for_pnet: list[bool]  # False for the working image (unless min_face_size == 12) and crop-only octaves

    def add(self, size: tuple[int, int], for_pnet: bool) -> None:
        h, w = self.levels[0].shape[:2]
        if size == (self.levels[-1].shape[1], self.levels[-1].shape[0]):
            self.for_pnet[-1] = self.for_pnet[-1] or for_pnet  # same size twice: one level serves both
            return
        # Each level shrinks the previous one (not the full image): same quality, a fraction of the cost.
        self.levels.append(_shrink(self.levels[-1], size))
        self.scales.append((size[0] / w, size[1] / h))
        self.for_pnet.append(for_pnet)

    def crops(self, boxes: np.ndarray, size: int) -> list[np.ndarray]:
        """``size``x``size`` crops of float boxes (outside the image is black, as in the original MTCNN)."""
        level, matrices = _crop_plan(boxes, self.scales, size)
        return [cv2.warpAffine(self.levels[k], m, (size, size), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
                for k, m in zip(level.tolist(), matrices)]


def _crop_plan(boxes: np.ndarray, scales: list[tuple[float, float]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each float box: the pyramid level to sample its ``size``x``size`` crop from and the 2x3 matrix taking
    that level's pixels to crop pixels.

    Each crop is sampled from the smallest level that still has >= ``size`` pixels across the box; levels are at
    most 2x apart, so bilinear sampling never shrinks by more than 2x (no aliasing) and huge boxes cost no more
    than small ones.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    bw = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-3)
    bh = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-3)
    level_scales = np.asarray(scales)  # (L, 2), decreasing
    # Number of smaller levels still >= size across the box (monotone in the level index) = the level to use.
    fits = np.minimum(bw[:, None] * level_scales[None, 1:, 0], bh[:, None] * level_scales[None, 1:, 1]) >= size
    level = fits.sum(axis=1)
    ax = size / (bw * level_scales[level, 0])
    ay = size / (bh * level_scales[level, 1])
    # Pixel-centre convention: level pixel i sits at (i + 0.5) / s in working-image coordinates.
    matrices = np.zeros((len(boxes), 2, 3))
    matrices[:, 0, 0] = ax
    matrices[:, 0, 2] = 0.5 * ax - boxes[:, 0] * size / bw - 0.5
    matrices[:, 1, 1] = ay
    matrices[:, 1, 2] = 0.5 * ay - boxes[:, 1] * size / bh - 0.5
    return level, matrices


def shrink_tensor(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``_shrink`` on the device: (1,3,H,W) float -> (1,3,h,w) for ``size`` (w, h); antialiased (a triangle filter,
    close to INTER_AREA) for the strong reductions, plain bilinear for the mild pyramid steps."""
    ratio = min(size[0] / image.shape[3], size[1] / image.shape[2])
    return F.interpolate(image, size=(size[1], size[0]), mode="bilinear", align_corners=False,
                         antialias=ratio <= 0.7)


def _stack_channels_first(images: list[np.ndarray | torch.Tensor], device: torch.device) -> torch.Tensor:
    """HxWx3 uint8 images of one size as one contiguous (B,3,H,W) batch on ``device``. Tensors (nvJPEG's are
    (3,H,W) underneath their HxWx3 views) stack channels first in one plain copy; host arrays go up as one HWC batch
    (one upload) and are laid out on the device."""
    if all(isinstance(image, torch.Tensor) for image in images):
        return torch.stack([image.permute(2, 0, 1) for image in images]).to(device)
    host = np.stack([image if isinstance(image, np.ndarray) else image.cpu().numpy() for image in images])
    return torch.from_numpy(host).to(device).permute(0, 3, 1, 2).contiguous()


def whole_factor(h: int, w: int, size: tuple[int, int] | None) -> int | None:
    """The whole number (2 or more) by which an h x w image shrinks to ``size`` (w, h) on both axes, else None."""
    if size is None or w % size[0] or h % size[1] or w // size[0] != h // size[1] or w // size[0] < 2:
        return None
    return w // size[0]


def shrink_by_whole_factor(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """(B,3,H,W) uint8 -> (B,3,H/factor,W/factor) float: the mean of each factor x factor block, which is OpenCV's
    INTER_AREA at a whole-number factor (``_shrink`` on the host path) before its rounding to uint8. A block-mean
    pool instead of the antialiased bilinear pass: closer to the host path's working image and cheaper
    (bench.profile_shrink, 16 1080p photos on an H100: 0.47 vs 0.72 ms; a uint8 block-sum reduction took 1.10;
    a fused kernel reading the uint8 pixels saved no GPU time at 8 rows, session 14). On CUDA the block means come
    straight from the pixels in one Triton kernel (the same values: 0.107 vs 0.479 ms per 16 photos on an H100,
    session 18; FACEFUSE_TRITON_SHRINK=off keeps avg_pool2d)."""
    if triton_kernels.use_triton_shrink(pixels.device):
        return triton_kernels.block_means(pixels, factor)
    return F.avg_pool2d(pixels.float(), factor)


@dataclass
class _TensorPyramid:
    """``_Pyramid`` for a batch of same-size images on the device: (B,3,h,w) float levels (0..255), ``images`` the
    batch's image numbers in the ``detect_batch`` call. One P-Net launch per level serves the whole batch, and the
    R-/O-Net crops of every image and level come from one gather over the flattened levels."""

    levels: list[torch.Tensor]
    scales: list[tuple[float, float]]
    for_pnet: list[bool]
    images: list[int] = field(default_factory=lambda: [0])
    _flat: tuple[torch.Tensor, np.ndarray, np.ndarray] | None = None

    def add(self, size: tuple[int, int], for_pnet: bool) -> None:
        h, w = self.levels[0].shape[2:]
        if size == (self.levels[-1].shape[3], self.levels[-1].shape[2]):
            self.for_pnet[-1] = self.for_pnet[-1] or for_pnet
            return
        self.levels.append(shrink_tensor(self.levels[-1], size))
        self.scales.append((size[0] / w, size[1] / h))
        self.for_pnet.append(for_pnet)

    def _flattened(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Every level as one (3, pixels) buffer on the device, with each level's start in it and its (h, w) on the
        host (made once, reused by R-Net and O-Net)."""
        if self._flat is None:
            parts = [level.transpose(0, 1).reshape(3, -1) for level in self.levels]
            starts = np.cumsum([0] + [part.shape[1] for part in parts[:-1]]).astype(np.int64)
            sizes = np.array([level.shape[2:] for level in self.levels], dtype=np.int64)  # (levels, 2): h, w
            self._flat = (torch.cat(parts, dim=1), starts, sizes)
        return self._flat

    def crops(self, boxes: np.ndarray, batch_index: np.ndarray, size: int) -> torch.Tensor:
        """(N,3,size,size) float crops (0..255, black outside the image) of ``boxes`` in the images at
        ``batch_index``; same geometry and sampling as ``_Pyramid.crops`` (and as ``grid_sample``, bilinear, zero
        padding, pixel centres), written as a gather so that crops of any image and level go in one launch.

        A crop is separable (each crop row samples the same two level rows, each column the same two columns), so
        the host works out each crop's two source rows and columns and their weights per axis, (N, 2, size) small
        tables in one upload; the device does one gather of the 2 x 2 taps and one weighted sum (a handful of
        kernels, not the dozens of a per-tap loop: the host's launches, not the GPU, bound this step)."""
        level, matrices = _crop_plan(boxes, self.scales, size)
        flat, starts, sizes = self._flattened()
        height, width = sizes[level, 0][:, None, None], sizes[level, 1][:, None, None]  # (n, 1, 1)
        base = starts[level][:, None, None] + np.asarray(batch_index, dtype=np.int64)[:, None, None] * height * width
        centres = np.arange(size, dtype=np.float64)
        taps = np.arange(2)[None, :, None]  # (1, 2, 1): the lower and the upper neighbour

        def axis(row: int, extent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # Crop pixel centre i maps back to level pixel (i - t) / a (the inverse of _crop_plan's matrix).
            position = ((centres[None, :] - matrices[:, row, 2:3]) / matrices[:, row, row:row + 1]).astype(np.float32)
            low = np.floor(position)
            fraction = position - low
            index = low.astype(np.int64)[:, None, :] + taps  # (n, 2, size)
            weight = np.stack([np.float32(1.0) - fraction, fraction], axis=1)
            weight *= (index >= 0) & (index < extent)  # outside the image: zero, as grid_sample's zero padding
            return np.clip(index, 0, extent - 1), weight

        rows, row_weights = axis(1, height)
        columns, column_weights = axis(0, width)
        rows, columns, row_weights, column_weights = to_device(
            [base + rows * width, columns, row_weights, column_weights], flat.device)  # one upload, one wait
        index = rows[:, :, :, None, None] + columns[:, None, None, :, :]  # (n, 2, size, 2, size)
        weight = row_weights[:, :, :, None, None] * column_weights[:, None, None, :, :]
        return (flat[:, index] * weight).sum(dim=(2, 4)).transpose(0, 1)  # (3, n, size, size) -> (n, 3, ...)


def _check_rgb(rgb: np.ndarray | torch.Tensor) -> None:
    """HxWx3 uint8 RGB, as a numpy array or a tensor, else ValueError."""
    uint8 = np.uint8 if isinstance(rgb, np.ndarray) else torch.uint8
    if not isinstance(rgb, np.ndarray | torch.Tensor) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != uint8:
        desc = f"{rgb.dtype} {tuple(rgb.shape)}" if isinstance(rgb, np.ndarray | torch.Tensor) else type(rgb).__name__
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {desc}")


class FaceDetector:
    """MTCNN face detector; one instance holds the three nets on ``device`` and is reusable across calls.

    Images whose longest side exceeds ``max_side`` are first shrunk to it, and ``min_face_size`` (the smallest face
    searched for) counts pixels of that shrunk working image; results are always in input-image pixels.
    ``compile_nets``: BlazeFace's CUDA graphs capture its graph through torch.compile (batch_buckets.BucketedNet).
    """

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7), max_side: int = 1280,
                 min_face_fraction: float = 0.0, images_on_device: bool | None = None,
                 proposals: str = "mtcnn", cuda_graphs: bool = True, compile_nets: bool = False) -> None:
        if proposals not in PROPOSAL_CHOICES:
            raise ValueError(f"proposals must be one of {PROPOSAL_CHOICES}, got {proposals!r}")
        if min_face_size < _PNET_CELL:
            raise ValueError(f"min_face_size must be >= {_PNET_CELL}, got {min_face_size}")
        if max_side < _PNET_CELL:
            raise ValueError(f"max_side must be >= {_PNET_CELL}, got {max_side}")
        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities, got {thresholds!r}")
        self.device = torch.device(device)
        self.min_face_size = int(min_face_size)
        if not 0.0 <= min_face_fraction < 1.0:
            raise ValueError(f"min_face_fraction must be in [0, 1), got {min_face_fraction}")
        # Faces smaller than this fraction of the (working) image's shorter side are not searched for: the
        # pyramid's finest, costliest levels exist only for them.
        self.min_face_fraction = float(min_face_fraction)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.max_side = int(max_side)
        # On CPU one big pass spills activations out of cache, so work is cut into cache-sized pieces (exact for
        # P-Net, which is fully convolutional). A GPU wants the biggest launches instead.
        on_cpu = self.device.type == "cpu"
        # Pyramid and crops on the device (default: on CUDA). The CPU does them faster with OpenCV.
        self.images_on_device = (not on_cpu) if images_on_device is None else bool(images_on_device)
        self._strip_pixels = _CPU_PNET_PIXELS if on_cpu else None
        # Device-path batches padded to power-of-two buckets, all run once by warm_up (facefuse.batch_buckets).
        self.pad_batches = self.images_on_device and self.device.type == "cuda"
        self._crop_pixels = _CPU_CROP_PIXELS if on_cpu else None
        self.pnet = _load(PNet(), "pnet", self.device)
        self.rnet = _load(RNet(), "rnet", self.device)
        self.onet = _load(ONet(), "onet", self.device)
        # R-/O-Net (and BlazeFace) batches replayed from CUDA graphs per bucket where batches are padded (P-Net's
        # input shapes vary with the photo: it runs eagerly).
        self._rnet = BucketedNet(self.rnet, self.pad_batches, cuda_graphs)
        self._onet = BucketedNet(self.onet, self.pad_batches, cuda_graphs)
        # "blazeface": candidate faces from one BlazeFace pass over each photo instead of P-Net's pyramid; R-Net and
        # O-Net refine them as usual (5 landmarks). On the device path the graph runs in PyTorch on the device.
        self.proposals = "blazeface" if proposals == "auto" else proposals
        self.blazeface = None
        if self.proposals == "blazeface":
            from facefuse.blazeface import BlazeFace

            self.blazeface = BlazeFace(self.device, min_score=_BLAZEFACE_MIN_SCORE,
                                       runtime="torch" if self.images_on_device else "auto",
                                       pad_batches=self.pad_batches, cuda_graphs=cuda_graphs,
                                       compile_net=compile_nets)

    # -- public API -------------------------------------------------------------------------------------------

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        """Faces in one HxWx3 uint8 RGB image, largest box first; [] when there are none."""
        return self.detect_batch([rgb])[0]

    def detect_batch(self, images: list[np.ndarray | torch.Tensor]) -> list[list[DetectedFace]]:
        """Faces per image (HxWx3 uint8 RGB arrays, or tensors, e.g. decoded on the GPU). R-Net and O-Net each see
        the crops of all images as one batch (split into cache-sized sub-batches on CPU), so a batch costs less
        than separate calls."""
        with torch.inference_mode():
            if self.images_on_device:
                found, back_scales = self._detect_on_device(images)
            else:
                works, back_scales = [], []
                for rgb in images:
                    work, scale = self._prepare(rgb)
                    works.append(work)
                    back_scales.append(scale)
                found = self._detect_on_host(works)
        boxes, scores, landmarks, ids = found
        results: list[list[DetectedFace]] = []
        for i, (sx, sy) in enumerate(back_scales):
            sel = ids == i
            # Map from the (possibly downscaled) working image back to input pixels.
            box = boxes[sel] / np.array([sx, sy, sx, sy])
            pts = landmarks[sel] / np.array([sx, sy])
            results.append(_to_faces(box, scores[sel], pts))
        return results

    def warm_up(self, image_sizes: Sequence[tuple[int, int]] = ((1080, 1920),), largest_group: int = 64) -> int:
        """On the device path, run each net once at every shape a batch can bring (facefuse.batch_buckets): P-Net
        over the pyramid of each (height, width) photo size for groups of every bucket up to ``largest_group``
        images, R-Net and O-Net at every crop bucket. New shapes cost a one-off each on the GPU (~0.1 s for a new
        batch), paid here at load instead of by requests. Returns the number of forward passes (0 off the device
        path)."""
        if not (self.images_on_device and self.pad_batches):
            return 0
        passes = 0
        with torch.inference_mode():
            for height, width in image_sizes:
                size = self._working_size(height, width) or (width, height)
                for group in bucket_sizes(min(largest_group, self._images_per_pass(height, width))):
                    work = torch.zeros((group, 3, size[1], size[0]), device=self.device)
                    pyramid = self._pyramid(work)
                    for level, for_pnet in zip(pyramid.levels, pyramid.for_pnet):
                        if for_pnet:
                            self.pnet(level)
                            passes += 1
            if self.blazeface is not None:  # every photo of a call goes through it in one pass
                from facefuse.blazeface import INPUT_SIZE

                for group in bucket_sizes(largest_group):
                    self.blazeface.runner(torch.zeros((group, 3, INPUT_SIZE, INPUT_SIZE), device=self.device))
                    passes += 1
            for net, side in ((self._rnet, 24), (self._onet, 48)):
                for crops in bucket_sizes(self._crop_step(side)):
                    net(torch.zeros((crops, 3, side, side), device=self.device))
                    passes += 1
        return passes

    # -- preparation ------------------------------------------------------------------------------------------

    def _working_size(self, h: int, w: int) -> tuple[int, int] | None:
        """(w, h) of the working image for an h x w photo, None when it is used as it is. Bounds the cost on huge
        photos: the pyramid's work grows with pixel count."""
        if max(h, w) <= self.max_side:
            return None
        ratio = self.max_side / max(h, w)
        return max(1, round(w * ratio)), max(1, round(h * ratio))

    def _prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
        _check_rgb(rgb)
        h, w = rgb.shape[:2]
        size = self._working_size(h, w)
        if size is None:
            return np.ascontiguousarray(rgb), (1.0, 1.0)
        return _shrink(rgb, size), (size[0] / w, size[1] / h)  # exact per-axis ratios of the rounded size

    def _prepare_groups(self, images: list[np.ndarray | torch.Tensor], for_pnet: bool = True,
                        ) -> tuple[list[_TensorPyramid], list[tuple[float, float]]]:
        """``_prepare`` and ``_pyramid`` (``for_pnet`` False: ``_crop_pyramid``) on the device, for images grouped
        by size: each group of same-size images is one (B,3,h,w) working batch with one pyramid. Returns the groups
        and each image's per-axis scale."""
        for rgb in images:
            _check_rgb(rgb)
        by_size: dict[tuple[int, int], list[int]] = {}
        for idx, rgb in enumerate(images):
            by_size.setdefault(tuple(rgb.shape[:2]), []).append(idx)
        groups, back_scales = [], [(1.0, 1.0)] * len(images)
        for (h, w), members in by_size.items():
            size = self._working_size(h, w)
            per_pass = self._images_per_pass(h, w)
            factor = whole_factor(h, w, size)
            for first in range(0, len(members), per_pass):
                chunk = members[first:first + per_pass]
                pixels = _stack_channels_first([images[i] for i in chunk], self.device)
                if size is None:
                    work, scale = pixels.float(), (1.0, 1.0)
                elif factor is not None:  # e.g. 1080p to 640 x 360: block means (INTER_AREA), not the antialiased pass
                    work, scale = shrink_by_whole_factor(pixels, factor), (size[0] / w, size[1] / h)
                else:
                    work, scale = shrink_tensor(pixels.float(), size), (size[0] / w, size[1] / h)
                pyramid = self._pyramid(work) if for_pnet else self._crop_pyramid(work)
                pyramid.images = chunk
                groups.append(pyramid)
                for i in chunk:
                    back_scales[i] = scale
        return groups, back_scales

    def _images_per_pass(self, h: int, w: int) -> int:
        """Same-size h x w photos prepared and run through P-Net together on the device: bounds both the float
        copies of the decoded images and the batched P-Net activations."""
        size = self._working_size(h, w)
        working_pixels = h * w if size is None else size[0] * size[1]
        limit = max(1, min(_MAX_DEVICE_PIXELS // (h * w), _MAX_PNET_PIXELS // working_pixels))
        # With padded batches a power of two, so that padding the last pass never goes past the bound.
        return 1 << (limit.bit_length() - 1) if self.pad_batches else limit

    def _pnet_scales(self, h: int, w: int) -> list[float]:
        scales = []
        min_face = max(self.min_face_size, self.min_face_fraction * min(h, w))
        scale = _PNET_CELL / min_face  # a min_face-pixel face becomes one 12 px P-Net window
        while min(h, w) * scale >= _PNET_CELL:
            scales.append(scale)
            scale *= _PYRAMID_FACTOR
        return scales

    def _pyramid(self, work: np.ndarray | torch.Tensor) -> _Pyramid | _TensorPyramid:
        pyramid, h, w = _base_pyramid(work)
        pnet_scales = self._pnet_scales(h, w)
        if not pnet_scales:
            return pyramid
        # Crop-only octaves keep levels <= 2x apart even when a large min_face_size puts the first P-Net level far
        # below the working image (see _Pyramid.crops).
        octave = 1.0
        while pnet_scales[0] < octave * 0.5:
            octave *= 0.5
            pyramid.add((math.ceil(w * octave), math.ceil(h * octave)), for_pnet=False)
        for scale in pnet_scales:
            pyramid.add((math.ceil(w * scale), math.ceil(h * scale)), for_pnet=True)
        return pyramid

    def _to_tensor(self, batch: np.ndarray) -> torch.Tensor:
        # uint8 travels to the device (4x less than float) and is normalised there. The NHWC->NCHW permute is a
        # view, i.e. a channels-last tensor, which oneDNN also runs fastest on CPU.
        if not batch.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only memory
            batch = batch.copy()
        t = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        return t.sub_(127.5).mul_(0.0078125)  # in place: no extra full-size temporaries

    # -- stages ---------------------------------------------------------------------------------------------------

    def _run_pnet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[2:]
        if self._strip_pixels is None or h * w <= self._strip_pixels:
            return self.pnet(x)
        rows = max(32, self._strip_pixels // w // 2 * 2)  # even, so pooling windows align with the full image
        probs, regs = [], []
        for top in range(0, h, rows):
            # A strip of rows + 10 input rows yields exactly rows / 2 output rows (12 px window, stride 2).
            if math.ceil((min(h, top + rows + 10) - top - 2) / 2) - 4 <= 0:
                break
            prob, reg = self.pnet(x[:, :, top:top + rows + 10])
            probs.append(prob)
            regs.append(reg)
        return torch.cat(probs, dim=1), torch.cat(regs, dim=2)

    def _stage_pnet(self, pyramids: list[_Pyramid]) -> tuple[np.ndarray, np.ndarray]:
        windows = []  # per image and pyramid level: (image, level, grid cells, boxes, scores, offsets)
        for idx, pyramid in enumerate(pyramids):
            for number, (level, (sx, sy), for_pnet) in enumerate(zip(pyramid.levels, pyramid.scales,
                                                                      pyramid.for_pnet)):
                if not for_pnet:
                    continue
                prob, offsets = self._run_pnet(self._to_tensor(level[None]))
                mask = prob[0] >= self.thresholds[0]
                rows_cols = mask.nonzero().cpu().numpy()
                if len(rows_cols) == 0:
                    continue
                score = prob[0][mask].float().cpu().numpy().astype(np.float64)
                reg = offsets[0].permute(1, 2, 0)[mask].float().cpu().numpy().astype(np.float64)
                boxes = _window_boxes(rows_cols[:, 0], rows_cols[:, 1], sx, sy)
                windows.append((np.full(len(boxes), idx), np.full(len(boxes), number), rows_cols, boxes, score, reg))
        return _pnet_proposals(*(np.concatenate(parts) for parts in zip(*windows))) if windows else _no_proposals()

    def _stage_pnet_tensor(self, pyramids: list[_TensorPyramid]) -> tuple[np.ndarray, np.ndarray]:
        """``_stage_pnet`` with batched pyramids on the device: one P-Net launch per level for each group of
        same-size images; every window above the threshold is gathered on the device and reaches the host in one
        copy for the whole call; the NMS runs on the host, all images and levels at once."""
        picked, level_scales = [], []  # level_scales[k] = (sx, sy) of the k-th level run (over all groups)
        pairs, count = [], 0  # grid-neighbour pairs of windows (indices into the table below) for the level NMS
        for pyramid in pyramids:
            images = torch.as_tensor(pyramid.images, device=self.device, dtype=torch.float64)
            for level, (sx, sy), for_pnet in zip(pyramid.levels, pyramid.scales, pyramid.for_pnet):
                if not for_pnet:
                    continue
                prob, offsets = forward_in_bucket(self.pnet, level.sub(127.5).mul_(0.0078125),
                                                   self.pad_batches)
                mask = prob >= self.thresholds[0]
                where = mask.nonzero()  # (n, 3): batch index, row, column
                pairs.append(_grid_neighbour_pairs(where, tuple(mask.shape), count, _NMS_PNET_SCALE))
                count += len(where)
                image_numbers = images[where[:, 0]]
                columns = [image_numbers, torch.full_like(image_numbers, len(level_scales)),
                           where[:, 1:].double(), prob[mask].double()[:, None],
                           offsets.permute(0, 2, 3, 1)[mask].double()]
                picked.append(torch.cat([c if c.ndim == 2 else c[:, None] for c in columns], dim=1))
                level_scales.append((sx, sy))
        if not picked:
            return _no_proposals()
        # (n, 9): image, level run, row, column, score, 4 offsets; and the candidate pairs
        table, neighbours = to_host([torch.cat(picked), torch.cat(pairs)])
        level_run = table[:, 1].astype(np.int64)
        sx, sy = np.asarray(level_scales)[level_run].T
        boxes = _window_boxes(table[:, 2], table[:, 3], sx, sy)
        return _pnet_proposals(table[:, 0].astype(np.int64), level_run, table[:, 2:4].astype(np.int64), boxes,
                               table[:, 4], table[:, 5:9], neighbours)

    def _crop_step(self, size: int) -> int:
        """Crops of ``size`` x ``size`` per R-/O-Net forward pass."""
        return _MAX_BATCH if self._crop_pixels is None else max(1, self._crop_pixels // (size * size))

    def _run_crops(self, net: BucketedNet, pyramids: list[_Pyramid] | list[_TensorPyramid], boxes: np.ndarray,
                   ids: np.ndarray, size: int) -> list[np.ndarray]:
        step = self._crop_step(size)
        if self.images_on_device:
            device_crops = torch.empty((len(boxes), 3, size, size), device=self.device)
            image_count = max(max(pyramid.images) for pyramid in pyramids) + 1
            for pyramid in pyramids:
                local = np.full(image_count, -1)  # image number -> index in this group's batch
                local[pyramid.images] = np.arange(len(pyramid.images))
                sel = np.flatnonzero(local[ids] >= 0)
                for first in range(0, len(sel), _MAX_BATCH):  # bounds the gather's index temporaries
                    part = sel[first:first + _MAX_BATCH]
                    crops = pyramid.crops(boxes[part], local[ids[part]], size)
                    if part[-1] - part[0] + 1 == len(part):  # consecutive rows (one group: always): no index upload
                        device_crops[part[0]:part[-1] + 1] = crops
                    else:
                        device_crops[to_device([part.astype(np.int64)], self.device)[0]] = crops
            device_crops.sub_(127.5).mul_(0.0078125)
            outs = [net(device_crops[s:s + step]) for s in range(0, len(boxes), step)]
            return to_host([torch.cat(parts).double() for parts in zip(*outs)])  # every output, one wait
        crops = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
        for i in np.unique(ids):
            sel = np.flatnonzero(ids == i)
            crops[sel] = pyramids[i].crops(boxes[sel], size)
        outs = [net(self._to_tensor(crops[s:s + step])) for s in range(0, len(crops), step)]
        return [torch.cat(parts).float().cpu().numpy().astype(np.float64) for parts in zip(*outs)]

    def _refine(self, pyramids: list, boxes: np.ndarray,
                ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """R-Net, then O-Net, on candidate boxes: (boxes, scores, landmarks, image numbers) of the faces."""
        return self._stage_onet(pyramids, *self._stage_rnet(pyramids, boxes, ids))

    def _detect_on_host(self, works: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The cascade on working images (host path), from P-Net's candidates or BlazeFace's."""
        if self.blazeface is None:
            pyramids = [self._pyramid(work) for work in works]
            return self._refine(pyramids, *self._stage_pnet(pyramids))
        pyramids = [self._crop_pyramid(work) for work in works]
        found = self._refine(pyramids, *self._blazeface_proposals(self.blazeface.detect_batch(works)))

        def with_pnet(numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            retry = [self._pyramid(works[number]) for number in numbers]
            return self._refine(retry, *self._stage_pnet(retry))

        return _with_pnet_fallback(found, len(works), with_pnet)

    def _detect_on_device(self, images: list[np.ndarray | torch.Tensor],
                          ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], list[tuple[float, float]]]:
        """The cascade with pyramids on the device (device path), from P-Net's candidates or BlazeFace's; and each
        image's per-axis working scale."""
        if self.blazeface is None:
            pyramids, back_scales = self._prepare_groups(images)
            return self._refine(pyramids, *self._stage_pnet_tensor(pyramids)), back_scales
        pyramids, back_scales = self._prepare_groups(images, for_pnet=False)
        rows = self.blazeface.detect_tensors([pyramid.levels[0] for pyramid in pyramids])
        by_image: list[np.ndarray] = [np.zeros((0, 5))] * len(images)
        for number, found_rows in zip((number for pyramid in pyramids for number in pyramid.images), rows):
            by_image[number] = found_rows
        found = self._refine(pyramids, *self._blazeface_proposals(by_image))

        def with_pnet(numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            retry, _ = self._prepare_groups([images[number] for number in numbers])
            return self._refine(retry, *self._stage_pnet_tensor(retry))

        return _with_pnet_fallback(found, len(images), with_pnet), back_scales

    def _crop_pyramid(self, work: np.ndarray | torch.Tensor) -> _Pyramid | _TensorPyramid:
        """The working image and its halvings: the levels R-/O-Net crops are sampled from without P-Net's."""
        pyramid, h, w = _base_pyramid(work)
        octave = 0.5
        while min(h, w) * octave >= 48:  # the largest crop (O-Net's) still fits inside
            pyramid.add((math.ceil(w * octave), math.ceil(h * octave)), for_pnet=False)
            octave *= 0.5
        return pyramid

    @staticmethod
    def _blazeface_proposals(found: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """BlazeFace's faces (rows per working image) as square candidate boxes for R-Net, with their image numbers.
        Its boxes frame the face from the brows to the chin; MTCNN's candidates include the forehead, so each box
        grows by _BLAZEFACE_GROWTH before squaring (R-Net's regression then fits it)."""
        boxes = [rows[:, :4] for rows in found]
        ids = [np.full(len(rows), number) for number, rows in enumerate(found)]
        if not any(len(part) for part in boxes):
            return _no_proposals()
        boxes, ids = np.concatenate(boxes), np.concatenate(ids).astype(np.int64)
        centre, size = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) * _BLAZEFACE_GROWTH
        return _square(np.concatenate([centre - size / 2, centre + size / 2], axis=1)), ids

    def _stage_rnet(self, pyramids: list[_Pyramid], boxes: np.ndarray,
                    ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(boxes) == 0:
            return boxes, ids
        prob, reg = self._run_crops(self._rnet, pyramids, boxes, ids, 24)
        ok = prob > self.thresholds[1]
        boxes, prob, reg, ids = boxes[ok], prob[ok], reg[ok], ids[ok]
        keep = _nms_per_image(boxes, prob, ids, _NMS_RNET)
        return _square(_regress(boxes[keep], reg[keep])), ids[keep]

    def _stage_onet(self, pyramids: list[_Pyramid], boxes: np.ndarray,
                    ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if len(boxes) == 0:
            return boxes, np.zeros(0), np.zeros((0, 5, 2)), ids
        prob, reg, points = self._run_crops(self._onet, pyramids, boxes, ids, 48)
        ok = prob > self.thresholds[2]
        boxes, prob, reg, points, ids = boxes[ok], prob[ok], reg[ok], points[ok], ids[ok]
        # Landmarks are relative to the crop O-Net saw, i.e. the box before its own regression.
        wh = (boxes[:, 2:4] - boxes[:, 0:2])[:, None, :]
        landmarks = boxes[:, None, 0:2] + np.stack([points[:, :5], points[:, 5:]], axis=2) * wh
        boxes = _regress(boxes, reg)
        keep = _nms_per_image(boxes, prob, ids, _NMS_ONET, mode="min")
        return boxes[keep], prob[keep], landmarks[keep], ids[keep]


def _base_pyramid(work: np.ndarray | torch.Tensor) -> tuple[_Pyramid | _TensorPyramid, int, int]:
    """A pyramid holding only the working image (an HxWx3 array, or a (B,3,H,W) device batch), and its h, w."""
    if isinstance(work, torch.Tensor):
        return _TensorPyramid(levels=[work], scales=[(1.0, 1.0)], for_pnet=[False]), *work.shape[2:]
    return _Pyramid(levels=[work], scales=[(1.0, 1.0)], for_pnet=[False]), *work.shape[:2]


def _with_pnet_fallback(found: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], image_count: int,
                        with_pnet: Callable[[np.ndarray], tuple[np.ndarray, ...]],
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """BlazeFace-proposed faces plus, for each image left without one, the cascade from P-Net's candidates
    (``with_pnet(image numbers)``, whose image numbers count within them). BlazeFace's full-range model is not made
    for one face filling the frame (the aligned sample crops), and it may nominate only boxes R-/O-Net reject."""
    missed = np.setdiff1d(np.arange(image_count), found[3])
    if len(missed) == 0:
        return found
    boxes, scores, landmarks, ids = with_pnet(missed)
    return (np.concatenate([found[0], boxes]), np.concatenate([found[1], scores]),
            np.concatenate([found[2], landmarks]), np.concatenate([found[3], missed[ids.astype(np.int64)]]))


def _window_boxes(rows: np.ndarray, cols: np.ndarray, sx: np.ndarray | float,
                  sy: np.ndarray | float) -> np.ndarray:
    """Working-image boxes of P-Net output cells (row, column) at a level of per-axis scale (sx, sy)."""
    x1 = cols * (_PNET_STRIDE / sx)
    y1 = rows * (_PNET_STRIDE / sy)
    return np.stack([x1, y1, x1 + _PNET_CELL / sx, y1 + _PNET_CELL / sy], axis=1)


def _pnet_proposals(image_ids: np.ndarray, levels: np.ndarray, cells: np.ndarray, boxes: np.ndarray,
                    scores: np.ndarray, offsets: np.ndarray,
                    neighbours: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """P-Net windows of every image and pyramid level -> square proposals for R-Net and their image numbers: NMS
    within each level of each image, then across the levels of each image, then the box regression.

    ``cells`` (n, 2) are the windows' (row, column) in P-Net's output grid. Exactly ``nms`` per level and then per
    image, but computed from the grid: within a level only windows a few cells apart can overlap enough, and
    windows of different levels differ so much in size that the second NMS can only drop something when the
    levels are unusually close (checked, then it runs). ``neighbours``: those grid-neighbour pairs when already
    found (on the device, ``_grid_neighbour_pairs``).
    """
    if len(boxes) == 0:
        return _no_proposals()
    groups = image_ids * (int(levels.max()) + 1) + levels
    keep = _grid_nms(groups, cells, boxes, scores, _NMS_PNET_SCALE, neighbours)
    image_ids, levels, boxes, scores, offsets = image_ids[keep], levels[keep], boxes[keep], scores[keep], offsets[keep]
    if _levels_may_overlap(image_ids, levels, boxes, _NMS_PNET_ALL):
        keep = nms_grouped(boxes, scores, image_ids, _NMS_PNET_ALL)
    else:  # what nms_grouped returns when it suppresses nothing: by image, then best score first
        keep = np.lexsort((-scores, image_ids))
    return _square(_regress(boxes[keep], offsets[keep])), image_ids[keep]


def _grid_shifts(threshold: float) -> list[tuple[int, int]]:
    """(row, column) steps between two P-Net windows of one level whose IoU may exceed ``threshold`` (with a margin
    for rounding), one of each +/- pair. Windows are 12x12 cells 2 px apart, so the IoU depends only on the step."""
    shifts = []
    reach = _PNET_CELL // _PNET_STRIDE
    for dr in range(0, reach):
        for dc in range(-reach + 1, reach):
            if (dr, dc) <= (0, 0):
                continue
            inter = max(_PNET_CELL - _PNET_STRIDE * abs(dr), 0) * max(_PNET_CELL - _PNET_STRIDE * abs(dc), 0)
            if inter / (2 * _PNET_CELL * _PNET_CELL - inter) > threshold - 1e-6:
                shifts.append((dr, dc))
    return shifts


def _grid_nms(groups: np.ndarray, cells: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
              threshold: float, neighbours: np.ndarray | None = None) -> np.ndarray:
    """``nms_grouped`` for windows on P-Net's grid (one group per image and level): candidate pairs come from the
    few grid neighbours that can overlap by more than ``threshold`` (``neighbours``, (p, 2) window indices, when
    already found, else from the cells here), not from a sweep; the overlaps themselves are computed from the
    boxes as in ``nms``, so the result is identical."""
    order = np.lexsort((-np.asarray(scores, dtype=np.float64), groups))
    n = len(order)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)  # position of each window in the processing order
    if neighbours is None:
        neighbours = _grid_neighbours(groups, cells, threshold)
    a, b = rank[neighbours[:, 0]], rank[neighbours[:, 1]]
    first, second = np.minimum(a, b), np.maximum(a, b)
    pair_order = np.argsort(first, kind="stable")
    first, second = first[pair_order], second[pair_order]
    ordered = np.asarray(boxes, dtype=np.float64)[order]
    areas = np.maximum(ordered[:, 2] - ordered[:, 0], 0.0) * np.maximum(ordered[:, 3] - ordered[:, 1], 0.0)
    hit = box_overlap(ordered[first], areas[first], ordered[second], areas[second], "union") > threshold
    return order[_greedy_from_pairs(n, first[hit], second[hit])]


def _grid_neighbours(groups: np.ndarray, cells: np.ndarray, threshold: float) -> np.ndarray:
    """(p, 2) indices of the window pairs of one group that are ``_grid_shifts(threshold)`` apart on the grid."""
    n = len(cells)
    rows, cols = cells[:, 0].astype(np.int64) + 8, cells[:, 1].astype(np.int64) + 8  # margins: no wrap-around
    width, height = int(cols.max()) + 9, int(rows.max()) + 9
    key = (groups.astype(np.int64) * height + rows) * width + cols
    by_key = np.argsort(key)
    sorted_keys = key[by_key]
    found_pairs = []
    for dr, dc in _grid_shifts(threshold):
        wanted = key + dr * width + dc
        at = np.minimum(np.searchsorted(sorted_keys, wanted), n - 1)
        found = np.flatnonzero(sorted_keys[at] == wanted)
        found_pairs.append(np.stack([found, by_key[at[found]]], axis=1))
    return np.concatenate(found_pairs)


def _grid_neighbour_pairs(where: torch.Tensor, shape: tuple[int, int, int], offset: int,
                          threshold: float) -> torch.Tensor:
    """``_grid_neighbours`` of one P-Net level on its device: ``where`` (n, 3) are the (image, row, column) of its
    windows above the threshold in a (B, H, W) output, numbered from ``offset`` in that order; returns (p, 2) int64
    window numbers."""
    number = torch.full(shape, -1, dtype=torch.int64, device=where.device)
    number[where[:, 0], where[:, 1], where[:, 2]] = torch.arange(offset, offset + len(where), device=where.device)
    height, width = shape[1:]
    found = []
    for dr, dc in _grid_shifts(threshold):  # window (r, c) and its neighbour (r + dr, c + dc)
        left, right = max(0, -dc), width - max(0, dc)
        if dr >= height or left >= right:
            continue
        here = number[:, : height - dr, left:right]
        there = number[:, dr:, left + dc:right + dc]
        both = (here >= 0) & (there >= 0)
        found.append(torch.stack([here[both], there[both]], dim=1))
    return torch.cat(found) if found else torch.zeros((0, 2), dtype=torch.int64, device=where.device)


def _levels_may_overlap(image_ids: np.ndarray, levels: np.ndarray, boxes: np.ndarray, threshold: float) -> bool:
    """False when no two windows of different levels of one image can have an IoU above ``threshold``: an IoU is
    at most the ratio of the smaller area to the larger, and pyramid levels 0.709 apart make windows ~2x apart in
    area. (Windows of one level were already thinned to IoU <= 0.5; a threshold not above that proves nothing.)"""
    if threshold <= _NMS_PNET_SCALE:
        return True
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    _, first_of_group = np.unique(image_ids * (int(levels.max()) + 1) + levels, return_index=True)
    image, area = image_ids[first_of_group], areas[first_of_group]
    by_image = np.lexsort((area, image))
    image, area = image[by_image], area[by_image]
    same_image = image[1:] == image[:-1]
    # A level's windows share one size up to rounding: 1e-6 of margin covers it.
    return bool(np.any(area[:-1][same_image] > area[1:][same_image] * threshold * (1.0 - 1e-6)))


def _no_proposals() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)


def _to_faces(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray) -> list[DetectedFace]:
    points = landmarks.copy()
    # ArcFace order is by image x whatever the head pose: sort each eye / mouth-corner pair by x.
    for a, b in ((0, 1), (3, 4)):
        swap = points[:, a, 0] > points[:, b, 0]
        points[swap, a], points[swap, b] = points[swap, b], points[swap, a]
    boxes32, points32 = boxes.astype(np.float32), points.astype(np.float32)
    # Largest first; ties broken by score, then position, so the order never depends on NMS internals.
    # (DetectedFace.area's arithmetic: float64 on the float32 box.)
    x1, y1, x2, y2 = boxes32.astype(np.float64).T
    areas = np.maximum(0.0, x2 - x1) * np.maximum(0.0, y2 - y1)
    order = np.lexsort((y1, x1, -np.asarray(scores, np.float64), -areas))
    return [DetectedFace(box=boxes32[i], score=float(scores[i]), landmarks=points32[i]) for i in order]

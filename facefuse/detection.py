"""MTCNN face detection (P-Net -> R-Net -> O-Net cascade) with 5-point landmarks.

The network definitions are our own; only the pretrained weights come from the ``facenet-pytorch`` wheel, whose
``data/{pnet,rnet,onet}.pt`` are plain state dicts. ``facenet_pytorch`` itself is never imported because its
``__init__`` imports torchvision, which must not be installed beside this torch.

Image handling (pyramid, crops) runs on the host with OpenCV on uint8 arrays; only the networks run on ``device``.
That keeps the pipeline deterministic and identical on CPU and CUDA, and the host work is small next to P-Net.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

_PYRAMID_FACTOR = 0.709
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
            "box": [round(float(v), 1) for v in self.box],
            "score": round(float(self.score), 4),
            "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in self.landmarks],
        }


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best score first.

    ``mode="min"`` divides the intersection by the smaller area, which also removes a small box nested in a large
    one (the last MTCNN stage uses it so a face is not reported twice at two sizes).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    order = np.argsort(-scores, kind="stable")  # stable: ties resolve the same way every run
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0.0)
        ih = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0.0)
        inter = iw * ih
        if mode == "min":
            denom = np.minimum(areas[i], areas[rest])
        else:
            denom = areas[i] + areas[rest] - inter
        overlap = inter / np.maximum(denom, 1e-9)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _nms_per_image(boxes: np.ndarray, scores: np.ndarray, image_ids: np.ndarray, threshold: float,
                   mode: str = "union") -> np.ndarray:
    keep = [np.flatnonzero(image_ids == i)[nms(boxes[image_ids == i], scores[image_ids == i], threshold, mode)]
            for i in np.unique(image_ids)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    wh = np.concatenate([boxes[:, 2:4] - boxes[:, 0:2]] * 2, axis=1)
    return boxes + offsets * wh


def _square(boxes: np.ndarray) -> np.ndarray:
    # R-/O-Net take square crops; grow the short side around the centre so the face keeps its aspect ratio.
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
    cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
    return np.stack([cx - side * 0.5, cy - side * 0.5, cx + side * 0.5, cy + side * 0.5], axis=1)


@dataclass
class _Pyramid:
    """One image at several scales: the working image first (scale 1), then each P-Net level, shrinking."""

    levels: list[np.ndarray]
    scales: list[tuple[float, float]]  # (x, y) ratio level / working image, exact for the rounded level size
    pnet_from: int = 1  # first level P-Net scans (0 only when min_face_size == 12 makes level 0 a P-Net level)

    def crops(self, boxes: np.ndarray, size: int) -> list[np.ndarray]:
        """``size``x``size`` crops of float boxes (outside the image is black, as in the original MTCNN).

        Each crop is sampled from the smallest level that still has >= ``size`` pixels across the box, so bilinear
        sampling never shrinks by more than 1/0.709 (no aliasing) and huge boxes cost no more than small ones.
        """
        out = []
        for x1, y1, x2, y2 in boxes:
            bw, bh = max(x2 - x1, 1e-3), max(y2 - y1, 1e-3)
            k = 0
            while k + 1 < len(self.levels) and min(bw * self.scales[k + 1][0], bh * self.scales[k + 1][1]) >= size:
                k += 1
            sx, sy = self.scales[k]
            ax, ay = size / (bw * sx), size / (bh * sy)
            # Pixel-centre convention: level index i sits at (i + 0.5) / s in working-image coordinates.
            m = np.array([[ax, 0.0, 0.5 * ax - x1 * size / bw - 0.5],
                          [0.0, ay, 0.5 * ay - y1 * size / bh - 0.5]])
            out.append(cv2.warpAffine(self.levels[k], m, (size, size), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0)))
        return out


class FaceDetector:
    """MTCNN face detector; one instance holds the three nets on ``device`` and is reusable across calls."""

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7), max_side: int = 1280) -> None:
        if min_face_size < _PNET_CELL:
            raise ValueError(f"min_face_size must be >= {_PNET_CELL}, got {min_face_size}")
        if max_side < _PNET_CELL:
            raise ValueError(f"max_side must be >= {_PNET_CELL}, got {max_side}")
        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities, got {thresholds!r}")
        self.device = torch.device(device)
        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.max_side = int(max_side)
        # On CPU one big pass spills activations out of cache, so work is cut into cache-sized pieces (exact for
        # P-Net, which is fully convolutional). A GPU wants the biggest launches instead.
        on_cpu = self.device.type == "cpu"
        self._strip_pixels = _CPU_PNET_PIXELS if on_cpu else None
        self._crop_pixels = _CPU_CROP_PIXELS if on_cpu else None
        self.pnet = _load(PNet(), "pnet", self.device)
        self.rnet = _load(RNet(), "rnet", self.device)
        self.onet = _load(ONet(), "onet", self.device)

    # -- public API -------------------------------------------------------------------------------------------

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        """Faces in one HxWx3 uint8 RGB image, largest box first; [] when there are none."""
        return self.detect_batch([rgb])[0]

    def detect_batch(self, images: list[np.ndarray]) -> list[list[DetectedFace]]:
        """Faces per image; R-Net and O-Net each run once over the crops of all images together."""
        pyramids, back_scales = [], []
        for rgb in images:
            work, scale = self._prepare(rgb)
            pyramids.append(self._pyramid(work))
            back_scales.append(scale)
        with torch.inference_mode():
            boxes, ids = self._stage_pnet(pyramids)
            boxes, ids = self._stage_rnet(pyramids, boxes, ids)
            boxes, scores, landmarks, ids = self._stage_onet(pyramids, boxes, ids)
        results: list[list[DetectedFace]] = []
        for i, (sx, sy) in enumerate(back_scales):
            sel = ids == i
            # Map from the (possibly downscaled) working image back to input pixels.
            box = boxes[sel] / np.array([sx, sy, sx, sy])
            pts = landmarks[sel] / np.array([sx, sy])
            results.append(_to_faces(box, scores[sel], pts))
        return results

    # -- preparation ------------------------------------------------------------------------------------------

    def _prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise ValueError(f"expected an HxWx3 uint8 RGB array, got {desc}")
        h, w = rgb.shape[:2]
        if max(h, w) <= self.max_side:
            return np.ascontiguousarray(rgb), (1.0, 1.0)
        # Bound the cost on huge photos: the pyramid's work grows with pixel count.
        ratio = self.max_side / max(h, w)
        size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        return small, (size[0] / w, size[1] / h)  # exact per-axis ratios of the rounded size

    def _pnet_scales(self, h: int, w: int) -> list[float]:
        scales = []
        scale = _PNET_CELL / self.min_face_size  # a min_face_size face becomes one 12 px P-Net window
        while min(h, w) * scale >= _PNET_CELL:
            scales.append(scale)
            scale *= _PYRAMID_FACTOR
        return scales

    def _pyramid(self, work: np.ndarray) -> _Pyramid:
        h, w = work.shape[:2]
        pyramid = _Pyramid(levels=[work], scales=[(1.0, 1.0)])
        for scale in self._pnet_scales(h, w):
            size = (math.ceil(w * scale), math.ceil(h * scale))
            if size == (w, h):
                pyramid.pnet_from = 0  # min_face_size == 12: P-Net scans the working image itself
                continue
            # Each level shrinks the previous one (not the full image): same quality, a fraction of the cost.
            pyramid.levels.append(cv2.resize(pyramid.levels[-1], size, interpolation=cv2.INTER_AREA))
            pyramid.scales.append((size[0] / w, size[1] / h))
        return pyramid

    def _to_tensor(self, batch: np.ndarray) -> torch.Tensor:
        # uint8 travels to the device (4x less than float) and is normalised there. The NHWC->NCHW permute is a
        # view, i.e. a channels-last tensor, which oneDNN also runs fastest on CPU.
        t = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        return (t - 127.5) * 0.0078125

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
        all_boxes, all_ids = [], []
        for idx, pyramid in enumerate(pyramids):
            per_level = []
            for level, (sx, sy) in zip(pyramid.levels[pyramid.pnet_from:], pyramid.scales[pyramid.pnet_from:]):
                prob, offsets = self._run_pnet(self._to_tensor(level[None]))
                mask = prob[0] >= self.thresholds[0]
                rows_cols = mask.nonzero().cpu().numpy()
                if len(rows_cols) == 0:
                    continue
                score = prob[0][mask].float().cpu().numpy().astype(np.float64)
                reg = offsets[0].permute(1, 2, 0)[mask].float().cpu().numpy().astype(np.float64)
                x1 = rows_cols[:, 1] * (_PNET_STRIDE / sx)
                y1 = rows_cols[:, 0] * (_PNET_STRIDE / sy)
                boxes = np.stack([x1, y1, x1 + _PNET_CELL / sx, y1 + _PNET_CELL / sy], axis=1)
                keep = nms(boxes, score, _NMS_PNET_SCALE)
                per_level.append((boxes[keep], score[keep], reg[keep]))
            if not per_level:
                continue
            boxes, score, reg = (np.concatenate(parts) for parts in zip(*per_level))
            keep = nms(boxes, score, _NMS_PNET_ALL)
            all_boxes.append(_square(_regress(boxes[keep], reg[keep])))
            all_ids.append(np.full(len(keep), idx, dtype=np.int64))
        if not all_boxes:
            return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
        return np.concatenate(all_boxes), np.concatenate(all_ids)

    def _run_crops(self, net: nn.Module, pyramids: list[_Pyramid], boxes: np.ndarray, ids: np.ndarray,
                   size: int) -> list[np.ndarray]:
        crops = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
        for i in np.unique(ids):
            sel = np.flatnonzero(ids == i)
            crops[sel] = pyramids[i].crops(boxes[sel], size)
        step = _MAX_BATCH if self._crop_pixels is None else max(1, self._crop_pixels // (size * size))
        outs = [net(self._to_tensor(crops[s:s + step])) for s in range(0, len(crops), step)]
        return [torch.cat(parts).float().cpu().numpy().astype(np.float64) for parts in zip(*outs)]

    def _stage_rnet(self, pyramids: list[_Pyramid], boxes: np.ndarray,
                    ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(boxes) == 0:
            return boxes, ids
        prob, reg = self._run_crops(self.rnet, pyramids, boxes, ids, 24)
        ok = prob > self.thresholds[1]
        boxes, prob, reg, ids = boxes[ok], prob[ok], reg[ok], ids[ok]
        keep = _nms_per_image(boxes, prob, ids, _NMS_RNET)
        return _square(_regress(boxes[keep], reg[keep])), ids[keep]

    def _stage_onet(self, pyramids: list[_Pyramid], boxes: np.ndarray,
                    ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if len(boxes) == 0:
            return boxes, np.zeros(0), np.zeros((0, 5, 2)), ids
        prob, reg, points = self._run_crops(self.onet, pyramids, boxes, ids, 48)
        ok = prob > self.thresholds[2]
        boxes, prob, reg, points, ids = boxes[ok], prob[ok], reg[ok], points[ok], ids[ok]
        # Landmarks are relative to the crop O-Net saw, i.e. the box before its own regression.
        wh = (boxes[:, 2:4] - boxes[:, 0:2])[:, None, :]
        landmarks = boxes[:, None, 0:2] + np.stack([points[:, :5], points[:, 5:]], axis=2) * wh
        boxes = _regress(boxes, reg)
        keep = _nms_per_image(boxes, prob, ids, _NMS_ONET, mode="min")
        return boxes[keep], prob[keep], landmarks[keep], ids[keep]


def _to_faces(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray) -> list[DetectedFace]:
    faces = []
    for box, score, pts in zip(boxes, scores, landmarks):
        pts = pts.copy()
        # ArcFace order is by image x whatever the head pose: sort each eye / mouth-corner pair by x.
        for a, b in ((0, 1), (3, 4)):
            if pts[a, 0] > pts[b, 0]:
                pts[[a, b]] = pts[[b, a]]
        faces.append(DetectedFace(box=box.astype(np.float32), score=float(score), landmarks=pts.astype(np.float32)))
    # Largest first; ties broken by score, then position, so the order never depends on NMS internals.
    faces.sort(key=lambda f: (-f.area, -f.score, float(f.box[0]), float(f.box[1])))
    return faces

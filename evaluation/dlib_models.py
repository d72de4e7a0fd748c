"""dlib's face models as the evaluation's independent judge: HOG detector, 68/5-point shapes, ResNet descriptor.

The model files and their loaders are facefuse/identity.py's (the service's identity blocklist uses the same ResNet).

Boxes are ``(x1, y1, x2, y2)`` in image pixels, typically our MTCNN boxes. dlib's shape predictors were trained on
the boxes of dlib's own HOG detector, which are tighter and lower than MTCNN's (no forehead), so a box is first
turned into a dlib-style rectangle: the HOG detection, run on a small rescaled window around the box, that overlaps
it best; failing that, the fixed conversion the service uses (facefuse.identity.dlib_rectangle).
"""

from __future__ import annotations

import functools

import cv2
import dlib
import numpy as np

from facefuse.identity import (  # one definition of the model files and loaders, shared with the service
    MODEL_FILES,
    SAME_PERSON_THRESHOLD,
    Box,
    descriptor_distance,
    dlib_rectangle,
    face_recognizer,
    model_path,
    models_dir,
    shape_predictor_5,
)

__all__ = ["MODEL_FILES", "SAME_PERSON_THRESHOLD", "Box", "NoFaceError", "box_iou", "descriptor",
           "descriptor_distance", "detect_faces", "face_rectangle", "face_recognizer", "landmarks5", "landmarks68",
           "model_path", "models_dir", "shape_predictor_5", "shape_predictor_68"]

# The HOG detector's window is 80x80; the local search rescales the box to about this width so that faces of any
# size are found at one pyramid level (cheap: a ~250 px window instead of the whole photo).
_LOCAL_FACE_WIDTH = 120.0
_LOCAL_MARGIN = 0.5  # search window = box grown by this fraction of its size on every side
_MIN_IOU = 0.3  # a HOG detection overlapping the box less than this is another face


class NoFaceError(ValueError):
    """dlib found no face where one was asked for."""


@functools.lru_cache(maxsize=1)
def frontal_detector() -> dlib.fhog_object_detector:
    return dlib.get_frontal_face_detector()


@functools.lru_cache(maxsize=1)
def shape_predictor_68() -> dlib.shape_predictor:
    return dlib.shape_predictor(str(model_path("shape68")))


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    return np.ascontiguousarray(rgb)  # dlib needs C-contiguous pixels


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _rect(x1: float, y1: float, x2: float, y2: float) -> dlib.rectangle:
    return dlib.rectangle(int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2)))


def _rect_box(rect: dlib.rectangle) -> tuple[float, float, float, float]:
    return float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom())


def detect_faces(rgb: np.ndarray, upsample: int | None = None) -> list[tuple[float, float, float, float]]:
    """dlib HOG detections on the whole image, largest first; small images are upsampled once by default."""
    rgb = _as_rgb(rgb)
    if upsample is None:
        upsample = 1 if min(rgb.shape[:2]) < 400 else 0
    rects = sorted(frontal_detector()(rgb, upsample), key=lambda r: -r.area())
    return [_rect_box(r) for r in rects]


def face_rectangle(rgb: np.ndarray, box: Box) -> tuple[dlib.rectangle, bool]:
    """dlib-style rectangle for the face in ``box``; the flag says whether dlib's own detector confirmed it."""
    rgb = _as_rgb(rgb)
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = max(1.0, x2 - x1), max(1.0, y2 - y1)
    height_px, width_px = rgb.shape[:2]
    wx1 = int(max(0, np.floor(x1 - _LOCAL_MARGIN * width)))
    wy1 = int(max(0, np.floor(y1 - _LOCAL_MARGIN * height)))
    wx2 = int(min(width_px, np.ceil(x2 + _LOCAL_MARGIN * width)))
    wy2 = int(min(height_px, np.ceil(y2 + _LOCAL_MARGIN * height)))
    if wx2 - wx1 >= 8 and wy2 - wy1 >= 8:
        scale = _LOCAL_FACE_WIDTH / width
        window = rgb[wy1:wy2, wx1:wx2]
        size = (max(1, round(window.shape[1] * scale)), max(1, round(window.shape[0] * scale)))
        window = cv2.resize(window, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        best, best_iou = None, _MIN_IOU
        for rect in frontal_detector()(np.ascontiguousarray(window), 0):
            candidate = (wx1 + rect.left() / scale, wy1 + rect.top() / scale,
                         wx1 + rect.right() / scale, wy1 + rect.bottom() / scale)
            iou = box_iou(candidate, (x1, y1, x2, y2))
            if iou >= best_iou:
                best, best_iou = candidate, iou
        if best is not None:
            return _rect(*best), True
    return dlib_rectangle(box), False


def _resolve(rgb: np.ndarray, box: Box | None) -> dlib.rectangle:
    if box is not None:
        return face_rectangle(rgb, box)[0]
    faces = detect_faces(rgb)
    if not faces:
        raise NoFaceError("dlib's HOG detector found no face")
    return _rect(*faces[0])


def _shape_points(shape: dlib.full_object_detection) -> np.ndarray:
    return np.array([(shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)], dtype=np.float64)


def landmarks68(rgb: np.ndarray, box: Box | None) -> np.ndarray:
    """The 68 iBUG 300-W landmarks (68, 2) float64 (x, y) of the face in ``box`` (largest HOG face if None)."""
    rgb = _as_rgb(rgb)
    return _shape_points(shape_predictor_68()(rgb, _resolve(rgb, box)))


def landmarks5(rgb: np.ndarray, box: Box | None) -> np.ndarray:
    """dlib's 5 landmarks (eye corners and nose base) of the face in ``box``."""
    rgb = _as_rgb(rgb)
    return _shape_points(shape_predictor_5()(rgb, _resolve(rgb, box)))


def descriptor(rgb: np.ndarray, box: Box | None = None) -> np.ndarray:
    """128-D dlib ResNet descriptor of the face in ``box`` (largest HOG face if None); raises NoFaceError.

    The 5-point shape is what the ResNet's 150x150 face chips were aligned with in training, so it is used here.
    """
    rgb = _as_rgb(rgb)
    shape = shape_predictor_5()(rgb, _resolve(rgb, box))
    return np.asarray(face_recognizer().compute_face_descriptor(rgb, shape, 0, 0.25), dtype=np.float64)


"""Method-agnostic quality metrics of one fused image: identity, geometry and seam visibility.

Every metric sees only pixels (the fused image, the original target, the original source) and the target face's
box from our detector, so our pipeline and the classic baseline are measured by exactly the same rules.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from evaluation.baseline import intermediate_shape
from evaluation.dlib_models import Box, descriptor, descriptor_distance, landmarks68

# iBUG 300-W indices of the outer eye corners; their distance is the usual "inter-ocular" normaliser.
OUTER_EYE_CORNERS = (36, 45)
# Changed-region detection: our output carries an invisible watermark that alters pixels everywhere by up to ~11
# levels, but after a Gaussian blur (sigma 1.5) it stays under ~4 levels; 6 levels separates it from real edits.
CHANGE_THRESHOLD = 6.0
CHANGE_SIGMA = 1.5
BAND_FRACTION = 0.04  # seam band half-width as a fraction of the face box width ...
MIN_BAND = 3  # ... but at least this many pixels


def identity_distances(fused_rgb: np.ndarray, target_box: Box, source_descriptor: np.ndarray,
                       target_descriptor: np.ndarray) -> tuple[float, float]:
    """(distance to source, distance to target) of the fused face found in ``target_box`` of the fused image."""
    fused = descriptor(fused_rgb, target_box)
    return descriptor_distance(fused, source_descriptor), descriptor_distance(fused, target_descriptor)


def intended_landmarks(source68: np.ndarray, target68: np.ndarray, profile_degree: float) -> np.ndarray:
    """The 68 points a fusion at this profile degree should show, in target image pixels: (1-p)*T + p*S_aligned,
    S_aligned being the source's points least-squares similarity-aligned onto the target's."""
    return intermediate_shape(source68, target68, profile_degree)


def landmark_error(fused_rgb: np.ndarray, target_box: Box, intended68: np.ndarray) -> float:
    """Mean distance between dlib's 68 points on the fused face and ``intended68``, divided by the intended
    outer-eye-corner distance (0 = exactly the intended geometry; ~0.05 is dlib's own noise level)."""
    found = landmarks68(fused_rgb, target_box)
    interocular = float(np.linalg.norm(intended68[OUTER_EYE_CORNERS[0]] - intended68[OUTER_EYE_CORNERS[1]]))
    return float(np.linalg.norm(found - intended68, axis=1).mean() / max(interocular, 1e-6))


def _roi(box: Box, shape: tuple[int, ...], grow: float) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (float(v) for v in box)
    gx, gy = grow * (x2 - x1), grow * (y2 - y1)
    return (int(max(0, math.floor(x1 - gx))), int(max(0, math.floor(y1 - gy))),
            int(min(shape[1], math.ceil(x2 + gx))), int(min(shape[0], math.ceil(y2 + gy))))


def changed_region(fused_rgb: np.ndarray, target_rgb: np.ndarray, face_box: Box) -> np.ndarray:
    """Boolean mask (image-sized) of the region the fusion changed around the face, holes filled.

    Pixels whose channel-wise max |fused - target|, Gaussian-blurred (sigma CHANGE_SIGMA), exceeds CHANGE_THRESHOLD
    levels; within the face box grown by one box size on every side; only connected components that touch the
    face box; then the outer contour of those components filled (so the outline is one closed curve per part).
    """
    if fused_rgb.shape != target_rgb.shape:
        raise ValueError(f"fused {fused_rgb.shape} and target {target_rgb.shape} differ in size")
    x0, y0, x1, y1 = _roi(face_box, fused_rgb.shape, 1.0)
    mask = np.zeros(fused_rgb.shape[:2], bool)
    if x1 <= x0 or y1 <= y0:
        return mask
    diff = np.abs(fused_rgb[y0:y1, x0:x1].astype(np.float32) - target_rgb[y0:y1, x0:x1]).max(axis=2)
    changed = (cv2.GaussianBlur(diff, (0, 0), CHANGE_SIGMA) > CHANGE_THRESHOLD).astype(np.uint8)
    count, labels = cv2.connectedComponents(changed, connectivity=8)
    bx0, by0, bx1, by1 = _roi(face_box, fused_rgb.shape, 0.0)
    touching = np.unique(labels[max(0, by0 - y0):by1 - y0, max(0, bx0 - x0):bx1 - x0])
    keep = np.isin(labels, touching[touching > 0]).astype(np.uint8)
    contours, _ = cv2.findContours(keep, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros_like(keep)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    mask[y0:y1, x0:x1] = filled.astype(bool)
    return mask


def _gradient(rgb: np.ndarray) -> np.ndarray:
    luma = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)  # BT.601 luma
    return cv2.magnitude(cv2.Sobel(luma, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(luma, cv2.CV_32F, 0, 1, ksize=3))


def seam_metrics(fused_rgb: np.ndarray, target_rgb: np.ndarray, face_box: Box) -> dict[str, float]:
    """Seam visibility of a fusion, two ways; see ``seam_metric`` for the definitions.

    Returns ``{"seam": ..., "seam_vs_target": ..., "changed_px": ...}`` (NaN ratios when nothing changed).
    """
    nan = float("nan")
    mask = changed_region(fused_rgb, target_rgb, face_box)
    result = {"seam": nan, "seam_vs_target": nan, "changed_px": float(mask.sum())}
    if not mask.any():
        return result
    x0, y0, x1, y1 = _roi(face_box, fused_rgb.shape, 1.0)
    inside = mask[y0:y1, x0:x1].astype(np.uint8)
    band = max(MIN_BAND, round(BAND_FRACTION * (float(face_box[2]) - float(face_box[0]))))
    # Distance of each inside pixel to the nearest outside pixel and vice versa; the outline lies between them.
    # distanceTransform counts nothing beyond the array as a zero, so where M is cut by the image's edge there is
    # no outline (a face at the photo's border has no seam there).
    dist_in = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
    dist_out = cv2.distanceTransform(1 - inside, cv2.DIST_L2, 5)
    boundary = ((inside == 1) & (dist_in <= band)) | ((inside == 0) & (dist_out <= band))
    inner = (inside == 1) & (dist_in > band) & (dist_in <= 3 * band)
    if boundary.sum() < 10 or inner.sum() < 10:
        return result
    fused_gradient = _gradient(fused_rgb[y0:y1, x0:x1])
    target_gradient = _gradient(target_rgb[y0:y1, x0:x1])
    on_outline = float(fused_gradient[boundary].mean())
    inner_mean = float(fused_gradient[inner].mean())
    target_mean = float(target_gradient[boundary].mean())
    result["seam"] = on_outline / inner_mean if inner_mean > 1e-6 else nan
    result["seam_vs_target"] = on_outline / target_mean if target_mean > 1e-6 else nan
    return result


def seam_metric(fused_rgb: np.ndarray, target_rgb: np.ndarray, face_box: Box) -> float:
    """Seam visibility: mean gradient magnitude on the outline of the changed region / just inside it.

    Definition (identical for every method):

    * M = ``changed_region(fused, target, face_box)``; its outline is the boundary between M and the rest
      (edges of the image excepted).
    * w = max(MIN_BAND, round(BAND_FRACTION * face box width)) pixels (4 px for a 100 px face; wide enough to
      hold a step edge although the blurred threshold puts the outline ~2 px outside it).
    * G = |Sobel gradient| (3x3) of the fused image's luma (BT.601).
    * Boundary band B: pixels within distance w of the outline, on either side (Euclidean distance transform).
    * Inner band I: pixels of M whose distance to the outline lies in (w, 3w].
    * seam = mean(G over B) / mean(G over I).

    About 1 or below means the outline is no busier than the face just inside it; a hard paste puts a step edge
    on the outline and usually gives well above 1. NaN when nothing changed (e.g. degrees 0/0) or M is too thin
    to hold an inner band. Caveat: the ratio depends on content (an outline running along the jaw or hairline
    rises without any seam; a busy inner band of eyes and brows lowers it), so compare methods on the same
    pairs. ``seam_metrics`` also gives ``seam_vs_target`` = mean(G over B) / mean(G_target over B), the same
    band's gradient before fusion: ~1 when the fusion added no edge along its outline, > 1 for a step; it is
    far less content-dependent and is reported beside the main figure.
    """
    return seam_metrics(fused_rgb, target_rgb, face_box)["seam"]

"""The classic landmark morph of DESIGN.md section 6, the yardstick our fusion network has to beat.

Steps (each timed):

1. ``landmarks``: dlib's 68 points on the source and target faces, inside the boxes our detector chose.
2. ``align``: the source's points similarity-aligned onto the target's (least squares over all 68, Umeyama); the
   intermediate shape is ``P = (1 - p) * T + p * S_aligned`` with ``p`` = profile degree / 100.
3. ``triangulate``: Delaunay triangulation (``cv2.Subdiv2D``) of ``P`` plus 8 points on a rectangle around the face
   (corners and edge midpoints); those 8 stay where they are in the target, so the warp fades to identity there.
4. ``warp``: a per-triangle affine warp of both the source and the target into ``P`` (every triangle's affine map is
   evaluated per pixel and applied with one ``cv2.remap`` per image, so neighbouring triangles cannot leave gaps).
5. ``blend``: cross-dissolve ``(1 - a) * target_warped + a * source_warped`` with ``a`` = face degree / 100, then
   ``cv2.seamlessClone`` (NORMAL_CLONE) of the convex hull of ``P`` into the target whose face rectangle has been
   replaced by the warped target, so that the face's outline really takes the intermediate shape instead of the
   target's old jaw showing around a smaller hull.

At degrees 0/0 ``P = T``, the target's warp is the identity and the clone copies the target onto itself, so the
output equals the target up to the Poisson solver's rounding.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from evaluation.dlib_models import Box, landmarks68

_RECT_MARGIN = 0.35  # the warped rectangle extends this fraction of the face's size beyond its landmarks
_CLONE_PAD = 4  # seamlessClone needs the mask strictly inside the image; pad so faces at the border still work


def similarity_transform(source_points: np.ndarray, target_points: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation, no reflection) taking source to target.

    Returns a 2x3 matrix ``M`` with ``target ≈ M @ [x, y, 1]`` (Umeyama 1991).
    """
    src = np.asarray(source_points, np.float64)
    dst = np.asarray(target_points, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    u, singular, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    sign = np.diag([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(singular) @ sign) / max((src_c**2).sum() / len(src), 1e-12))
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2) points through a 2x3 affine matrix."""
    points = np.asarray(points, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]


def intermediate_shape(source68: np.ndarray, target68: np.ndarray, profile_degree: float) -> np.ndarray:
    """``(1 - p) * T + p * S_aligned`` in target image coordinates: the geometry a fusion at this profile degree
    is meant to have (shared with evaluation.metrics so that both methods are judged against the same shape)."""
    p = float(np.clip(profile_degree / 100.0, 0.0, 1.0))
    aligned = apply_affine(similarity_transform(source68, target68), source68)
    return (1.0 - p) * np.asarray(target68, np.float64) + p * aligned


def _rectangle_points(points: np.ndarray) -> np.ndarray:
    """8 points (corners, edge midpoints) of the landmarks' bounding box grown by _RECT_MARGIN on every side."""
    (x1, y1), (x2, y2) = points.min(axis=0), points.max(axis=0)
    mx, my = _RECT_MARGIN * (x2 - x1), _RECT_MARGIN * (y2 - y1)
    x1, y1, x2, y2 = x1 - mx, y1 - my, x2 + mx, y2 + my
    xm, ym = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    return np.array([[x1, y1], [xm, y1], [x2, y1], [x2, ym], [x2, y2], [xm, y2], [x1, y2], [x1, ym]])


def delaunay(points: np.ndarray) -> np.ndarray:
    """(K, 3) vertex indices of the Delaunay triangulation of (N, 2) points (cv2.Subdiv2D)."""
    lo = np.floor(points.min(axis=0)) - 2
    hi = np.ceil(points.max(axis=0)) + 2
    subdiv = cv2.Subdiv2D((int(lo[0]), int(lo[1]), int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1))
    subdiv.insert([(float(x), float(y)) for x, y in points])
    triangles = []
    for row in subdiv.getTriangleList():
        corners = row.reshape(3, 2)
        # Subdiv2D hands back coordinates (float32), not indices: map each corner to its nearest input point.
        index = np.argmin(((points[None] - corners[:, None]) ** 2).sum(axis=2), axis=1)
        if len(set(index.tolist())) == 3:
            triangles.append(index)
    return np.array(triangles, dtype=np.int64).reshape(-1, 3)


def _triangle_affines(dst_points: np.ndarray, src_points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(K, 2, 3): for each triangle the affine map from its corners in dst_points to those in src_points."""
    ones = np.ones((len(triangles), 3, 1))
    dst = np.concatenate([dst_points[triangles], ones], axis=2)  # (K, 3, 3)
    src = src_points[triangles]  # (K, 3, 2)
    # Solve dst @ X = src per triangle (X: 3x2); degenerate triangles get the least-squares answer.
    return np.transpose(np.linalg.pinv(dst) @ src, (0, 2, 1))


def _label_map(dst_points: np.ndarray, triangles: np.ndarray, roi: tuple[int, int, int, int]) -> np.ndarray:
    """Per pixel of the ROI, the index of the triangle covering it (-1 outside every triangle)."""
    x0, y0, x1, y1 = roi
    labels = np.zeros((y1 - y0, x1 - x0), np.int32)
    for index, triangle in enumerate(triangles):
        corners = np.round((dst_points[triangle] - (x0, y0)) * 16).astype(np.int32)  # 4 fractional bits
        cv2.fillConvexPoly(labels, corners, index + 1, lineType=cv2.LINE_8, shift=4)
    return labels - 1


def _remap(image: np.ndarray, affines: np.ndarray, labels: np.ndarray, fallback: np.ndarray,
           origin: tuple[int, int]) -> np.ndarray:
    """Sample ``image`` at every ROI pixel through its triangle's affine map (``fallback`` outside triangles)."""
    ys, xs = np.mgrid[0:labels.shape[0], 0:labels.shape[1]].astype(np.float64)
    xs += origin[0]
    ys += origin[1]
    matrices = np.where((labels >= 0)[..., None, None], affines[np.maximum(labels, 0)], fallback)
    map_x = matrices[..., 0, 0] * xs + matrices[..., 0, 1] * ys + matrices[..., 0, 2]
    map_y = matrices[..., 1, 0] * xs + matrices[..., 1, 1] * ys + matrices[..., 1, 2]
    return cv2.remap(image, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 2)


def classic_fuse(source_rgb: np.ndarray, target_rgb: np.ndarray, face_degree: float, profile_degree: float,
                 source_box: Box | None, target_box: Box | None) -> tuple[np.ndarray, dict[str, float]]:
    """Morph the source face into the target face; returns the fused RGB image and per-stage times (ms).

    ``face_degree`` (0-100) weights the texture cross-dissolve, ``profile_degree`` (0-100) the shape.
    ``None`` boxes mean "the largest face dlib's HOG detector finds". Raises evaluation.dlib_models.NoFaceError.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    source68 = landmarks68(source_rgb, source_box)
    target68 = landmarks68(target_rgb, target_box)
    timings["landmarks"] = _ms(started)

    started = time.perf_counter()
    to_target = similarity_transform(source68, target68)
    shape = intermediate_shape(source68, target68, profile_degree)
    rectangle = _rectangle_points(np.vstack([target68, shape]))
    dst_points = np.vstack([shape, rectangle])
    target_points = np.vstack([target68, rectangle])
    # The rectangle's points in the source: the target's rectangle carried back through the alignment.
    to_source = invert_affine(to_target)
    source_points = np.vstack([source68, apply_affine(to_source, rectangle)])
    height, width = target_rgb.shape[:2]
    x0, y0 = (int(max(0, np.floor(v))) for v in rectangle.min(axis=0))
    x1, y1 = int(min(width, np.ceil(rectangle[:, 0].max()) + 1)), int(min(height, np.ceil(rectangle[:, 1].max()) + 1))
    roi = (x0, y0, x1, y1)
    timings["align"] = _ms(started)

    started = time.perf_counter()
    triangles = delaunay(dst_points)
    timings["triangulate"] = _ms(started)

    started = time.perf_counter()
    labels = _label_map(dst_points, triangles, roi)
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    target_warped = _remap(target_rgb, _triangle_affines(dst_points, target_points, triangles), labels, identity,
                           (x0, y0))
    source_warped = _remap(source_rgb, _triangle_affines(dst_points, source_points, triangles), labels, to_source,
                           (x0, y0))
    timings["warp"] = _ms(started)

    started = time.perf_counter()
    a = float(np.clip(face_degree / 100.0, 0.0, 1.0))
    dissolved = np.clip((1.0 - a) * target_warped + a * source_warped.astype(np.float64) + 0.5, 0, 255)
    dissolved = dissolved.astype(np.uint8)
    mask = np.zeros(labels.shape, np.uint8)
    hull = cv2.convexHull(np.round((shape - (x0, y0)) * 16).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_8, shift=4)
    pad = _CLONE_PAD
    dissolved_p = cv2.copyMakeBorder(dissolved, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    background_p = cv2.copyMakeBorder(target_warped, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    mask_p = cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    fused = target_rgb.copy()
    rows, cols = np.nonzero(mask_p)
    if len(rows):
        # OpenCV places the mask's bounding box at centre - size // 2 in the destination: this centre makes the
        # clone land exactly where it was cut from.
        bx, by, bw, bh = cv2.boundingRect(np.column_stack([cols, rows]).astype(np.int32))
        cloned = cv2.seamlessClone(dissolved_p, background_p, mask_p, (bx + bw // 2, by + bh // 2), cv2.NORMAL_CLONE)
        fused[y0:y1, x0:x1] = cloned[pad:-pad, pad:-pad]
    else:
        fused[y0:y1, x0:x1] = target_warped
    timings["blend"] = _ms(started)
    return fused, timings

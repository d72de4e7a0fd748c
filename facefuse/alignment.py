"""The canonical face crop: one 5-point template and the similarity transforms in and out of it.

The template is ArcFace's 112x112 five-point layout scaled to CROP_SIZE and shifted so that the whole face,
chin and forehead included, fits the crop (the 112 layout is tight around eyes and mouth).
"""

from __future__ import annotations

import cv2
import numpy as np

CROP_SIZE = 256

# ArcFace 5 points (x, y) in a 112x112 crop: eye, eye, nose tip, mouth corner, mouth corner (image left first).
_ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
# Fraction of the crop the ArcFace layout occupies; < 1 leaves room for chin, cheeks and forehead.
_TEMPLATE_ZOOM = 0.72


def _canonical_template(crop_size: int = CROP_SIZE) -> np.ndarray:
    centred = (_ARCFACE_112 - 56.0) * (crop_size / 112.0) * _TEMPLATE_ZOOM
    # Move the layout down a little so the forehead and chin both stay in the crop.
    return (centred + crop_size / 2.0 + np.array([0.0, 0.04 * crop_size])).astype(np.float32)


TEMPLATE = _canonical_template()


def estimate_similarity(source_points: np.ndarray, target_points: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping source to target (Umeyama).

    Returns a 2x3 float64 matrix M with target ≈ M @ [x, y, 1].
    """
    src = np.asarray(source_points, dtype=np.float64)
    dst = np.asarray(target_points, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    return estimate_similarities(src[None], dst[None])[0]


def estimate_similarities(source_points: np.ndarray, target_points: np.ndarray) -> np.ndarray:
    """``estimate_similarity`` for a batch: (B,N,2) and (B,N,2) point sets -> (B,2,3) matrices, one pass."""
    src = np.asarray(source_points, dtype=np.float64)
    dst = np.asarray(target_points, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 3 or src.shape[2] != 2 or src.shape[1] < 2:
        raise ValueError(f"need matching (B, N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    count = src.shape[1]
    src_mean, dst_mean = src.mean(axis=1), dst.mean(axis=1)
    src_c, dst_c = src - src_mean[:, None], dst - dst_mean[:, None]
    covariance = dst_c.transpose(0, 2, 1) @ src_c / count
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.where(np.linalg.det(u) * np.linalg.det(vt) < 0, -1.0, 1.0)  # avoid a reflection
    rotation = u @ (np.array([1.0, 0.0])[None, :, None] * vt + np.array([0.0, 1.0])[None, :, None] * vt
                    * sign[:, None, None])
    src_var = (src_c**2).sum(axis=(1, 2)) / count
    if np.any(src_var <= 1e-12):
        raise ValueError("degenerate source points (all equal)")
    scale = (singular[:, 0] + singular[:, 1] * sign) / src_var
    matrix = np.zeros((len(src), 2, 3), dtype=np.float64)
    matrix[:, :, :2] = scale[:, None, None] * rotation
    matrix[:, :, 2] = dst_mean - np.einsum("bij,bj->bi", matrix[:, :, :2], src_mean)
    return matrix


def alignment_matrix(landmarks: np.ndarray, crop_size: int = CROP_SIZE) -> np.ndarray:
    """2x3 matrix taking image pixels to the canonical crop for a face with these 5 landmarks."""
    return alignment_matrices(np.asarray(landmarks)[None], crop_size)[0]


def alignment_matrices(landmarks: np.ndarray, crop_size: int = CROP_SIZE) -> np.ndarray:
    """``alignment_matrix`` for a batch: (B, 5, 2) landmarks -> (B, 2, 3) matrices in one pass (a batch's 2B faces
    cost one call: each call is ~20 small numpy operations, ~90 us on the 2-core CPU, whatever the batch)."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    return estimate_similarities(landmarks, np.broadcast_to(_canonical_template(crop_size), landmarks.shape))


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine matrix."""
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to (N, 2) points."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ np.asarray(matrix, dtype=np.float64)[:, :2].T + np.asarray(matrix, dtype=np.float64)[:, 2]


def warp_to_crop(rgb: np.ndarray, matrix: np.ndarray, crop_size: int = CROP_SIZE) -> np.ndarray:
    """Cut the aligned face crop (crop_size x crop_size x 3 uint8) out of an image."""
    return cv2.warpAffine(
        rgb, np.asarray(matrix, dtype=np.float64), (crop_size, crop_size),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101,
    )


def crop_to_tensor(crop: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1], the fusion network's layout."""
    return np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def tensor_to_crop(tensor: np.ndarray) -> np.ndarray:
    """3xHxW float in [0, 1] -> HxWx3 float32 in [0, 255]."""
    return np.clip(np.asarray(tensor, dtype=np.float32).transpose(1, 2, 0) * 255.0, 0.0, 255.0)

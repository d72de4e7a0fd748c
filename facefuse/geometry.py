"""Geometry fusion in the canonical crop: the intermediate face shape for a profile degree, and the thin-plate
spline (TPS) warps that carry both crops onto it.

Preprocess solves the small TPS systems here (numpy); the fusion network only evaluates the splines on a
sampling grid (tensor ops), so the network stays free of linear solves and exports to TensorRT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from facefuse.alignment import CROP_SIZE, estimate_similarities, estimate_similarity, transform_points

# MediaPipe face-mesh silhouette, ordered around the face (a closed polygon, forehead top first, clockwise in
# image coordinates).
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
             176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
# Upper edges of the eyebrows (image-left brow, then image-right brow), used to cut the mask at brow height.
BROW_TOPS = (70, 63, 105, 66, 107, 336, 296, 334, 293, 300)
MESH_POINTS = 468
# Control points: the silhouette plus an even spread of the mesh, enough to carry eyes, nose, mouth and jaw.
CONTROL_INDICES = tuple(sorted(set(FACE_OVAL) | set(range(0, MESH_POINTS, 5))))
ANCHOR_COUNT = 20
# The crop's border, every 64 px: the spline must be the identity out there too, not only on the ring.
_BORDER_STEPS = np.arange(0.0, CROP_SIZE, CROP_SIZE / 4.0)
BORDER_ANCHORS = np.array([[x, 0.0] for x in _BORDER_STEPS] + [[CROP_SIZE - 1.0, y] for y in _BORDER_STEPS]
                          + [[CROP_SIZE - 1.0 - x, CROP_SIZE - 1.0] for x in _BORDER_STEPS]
                          + [[0.0, CROP_SIZE - 1.0 - y] for y in _BORDER_STEPS])
CONTROL_COUNT = len(CONTROL_INDICES) + ANCHOR_COUNT + len(BORDER_ANCHORS)
OUTLINE_POINTS = len(FACE_OVAL)
TPS_REGULARISATION = 1e-3
# How the GPU path solves its TPS systems (``_fit_tps_torch``): "lu", "cholesky", or "auto": Cholesky from
# TPS_CHOLESKY_ROWS systems on. bench.profile_tps on an H100 (2026-12-06): 8 systems 1.33 ms of GPU time by LU,
# 0.37 by Cholesky, the same wall time (2.5 ms); 1 system 0.81 ms wall by LU, 1.47 by Cholesky (more launches).
TPS_DEVICE_METHOD = "auto"
TPS_CHOLESKY_ROWS = 4


def tps_kernel(distance_squared: Any) -> Any:
    """U(r) = r^2 log r, written on r^2 (0 at r = 0); a numpy array or a torch tensor."""
    clipped = distance_squared.clip(1e-12)
    logs = np.log(clipped) if isinstance(clipped, np.ndarray) else clipped.log()
    return 0.5 * distance_squared * logs


def fit_tps(centres: np.ndarray, values: np.ndarray, regularisation: float = TPS_REGULARISATION) -> np.ndarray:
    """Solve the TPS through `centres` (K,2) taking `values` (K,D); returns (K+3, D): K kernel weights, then the
    affine part [1, x, y]. Coordinates are scaled to the unit crop first, so the system stays well conditioned."""
    return fit_tps_batch(np.asarray(centres)[None], np.asarray(values)[None], regularisation)[0]


def fit_tps_batch(centres: np.ndarray, values: np.ndarray, regularisation: float = TPS_REGULARISATION,
                  device: str | None = None, method: str = TPS_DEVICE_METHOD) -> np.ndarray:
    """``fit_tps`` for a batch: (B,K,2) centres and (B,K,D) values -> (B,K+3,D), one batched solve; on a CUDA
    ``device`` the systems are built and solved there (float64 too: the same result to ~1e-12), by ``method``
    (``_fit_tps_torch``)."""
    points = np.asarray(centres, np.float64) * (1.0 / CROP_SIZE)
    values = np.asarray(values, np.float64)
    if device is None or not str(device).startswith("cuda"):
        return np.linalg.solve(*_tps_system(points, values, regularisation, np.zeros))
    return _fit_tps_torch(points, values, regularisation, device, method)


def _fit_tps_torch(points: np.ndarray, values: np.ndarray, regularisation: float, device: str,
                   method: str = TPS_DEVICE_METHOD) -> np.ndarray:
    """The same systems built and solved with torch on ``device`` (unit-scaled points): one upload, one download.
    ``method`` "lu": the whole saddle-point system by LU; "cholesky": the spline's kernel part on the polynomials'
    null space by Cholesky (``_solve_projected``); "auto": Cholesky from TPS_CHOLESKY_ROWS systems on, else LU.
    Errors (a singular system) are read with the result: ``linalg`` calls that check them on the spot make the
    host wait for the GPU."""
    import torch

    def zeros(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=device)

    from facefuse.device_imaging import to_device, to_host

    if method == "auto":
        method = "cholesky" if len(points) >= TPS_CHOLESKY_ROWS else "lu"
    points_t, values_t = to_device([points, values], device)
    system, rhs = _tps_system(points_t, values_t, regularisation, zeros)
    if method == "cholesky":
        solution, info = _solve_projected(system, rhs, points.shape[1])
    else:
        solution, info = torch.linalg.solve_ex(system, rhs)
    solution, info = to_host([solution, info])
    if np.any(info != 0):
        raise np.linalg.LinAlgError(f"a thin-plate spline system could not be solved ({method}, info {info.tolist()})")
    return solution


def _solve_projected(system: Any, rhs: Any, count: int) -> tuple[Any, Any]:
    """The TPS saddle-point system [[A, P], [P^T, 0]] [w; a] = [y; 0] (A = kernel + regularisation, (B,K,K); P =
    [1, x, y]) solved through an SPD matrix: with H = P (P^T P)^-1 P^T the projector onto P's columns and N = I - H,
    M = N A N + H is positive definite (A is on P's null space, where w lives; H is the identity on P's range), and
    M w = N y gives w, then a = (P^T P)^-1 P^T (y - A w). One batched Cholesky instead of a pivoting LU of the
    larger indefinite system. Returns ([w; a] (B,K+3,D), Cholesky's info (B,))."""
    import torch

    kernel, polynomial, values = system[:, :count, :count], system[:, :count, count:], rhs[:, :count]
    gram_inverse = torch.linalg.inv_ex(polynomial.transpose(1, 2) @ polynomial)[0]  # (B,3,3), well conditioned
    projector = polynomial @ gram_inverse @ polynomial.transpose(1, 2)  # H
    kernel_projected = kernel - kernel @ projector  # A N
    matrix = kernel_projected - projector @ kernel_projected + projector  # N A N + H
    factor, info = torch.linalg.cholesky_ex(matrix)
    weights = torch.cholesky_solve(values - projector @ values, factor)
    affine = gram_inverse @ (polynomial.transpose(1, 2) @ (values - kernel @ weights))
    return torch.cat([weights, affine], dim=1), info


def _tps_system(points: Any, values: Any, regularisation: float, zeros: Callable[[tuple[int, ...]], Any]) -> tuple:
    """The (B,K+3,K+3) TPS systems and (B,K+3,D) right-hand sides for unit-scaled (B,K,2) points, as numpy arrays
    or torch tensors (``zeros`` makes them)."""
    batch, count = points.shape[:2]
    # x and y apart: a sum over a last axis of 2 is slow in numpy, and this is the same arithmetic.
    dx = points[:, :, None, 0] - points[:, None, :, 0]
    dy = points[:, :, None, 1] - points[:, None, :, 1]
    system = zeros((batch, count + 3, count + 3))
    system[:, :count, :count] = tps_kernel(dx * dx + dy * dy)
    if isinstance(system, np.ndarray):
        system[:, range(count), range(count)] += regularisation
    else:  # a view: indexing a tensor with host lists would upload them first (a wait for the GPU)
        system.diagonal(dim1=1, dim2=2)[:, :count] += regularisation
    system[:, :count, count] = 1.0
    system[:, :count, count + 1:] = points
    system[:, count, :count] = 1.0
    system[:, count + 1:, :count] = points.swapaxes(1, 2)
    rhs = zeros((batch, count + 3, values.shape[2]))
    rhs[:, :count] = values
    return system, rhs


def evaluate_tps(centres: np.ndarray, coefficients: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Evaluate a fitted TPS at (N,2) points (crop pixels); the numpy twin of the network's evaluation."""
    scale = 1.0 / CROP_SIZE
    query = np.asarray(points, np.float64) * scale
    kernel = tps_kernel(((query[:, None, :] - np.asarray(centres, np.float64)[None] * scale) ** 2).sum(-1))
    return kernel @ coefficients[:-3] + coefficients[-3] + query @ coefficients[-2:]


def anchor_ring(outline: np.ndarray, count: int = ANCHOR_COUNT, scale: float = 1.45) -> np.ndarray:
    """Fixed points on an ellipse around the face, where the warp must be the identity (background stays).
    ``outline`` (N,2), or (B,N,2) for a batch."""
    centre = outline.mean(axis=-2)
    half_axes = (outline.max(axis=-2) - outline.min(axis=-2)) / 2.0 * scale
    angles = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
    return centre[..., None, :] + np.stack([np.cos(angles), np.sin(angles)], axis=1) * half_axes[..., None, :]


def brow_to_chin_outline(mesh: np.ndarray) -> np.ndarray:
    """The silhouette cut at the eyebrows: points above the brow line are moved down onto it, so the mask
    leaves the forehead and hair to the target. ``mesh`` (468,2), or (B,468,2) for a batch."""
    outline = mesh[..., list(FACE_OVAL), :].astype(np.float64)
    brows = mesh[..., list(BROW_TOPS), :].astype(np.float64)
    left, right = brows[..., :5, :].mean(axis=-2), brows[..., 5:, :].mean(axis=-2)
    # A line through both brows, lifted a little so the brows themselves stay inside.
    length = np.linalg.norm(right - left, axis=-1)[..., None]
    lift = 0.12 * length
    direction = (right - left) / np.maximum(length, 1e-6)
    normal = np.stack([direction[..., 1], -direction[..., 0]], axis=-1)  # points up (smaller y) when upright
    offset = (normal * ((left + right) / 2.0)).sum(-1, keepdims=True) + lift
    height = (outline * normal[..., None, :]).sum(-1) - offset
    return outline - np.maximum(height, 0.0)[..., None] * normal[..., None, :]


def convex_outline(points: np.ndarray, count: int = OUTLINE_POINTS) -> np.ndarray:
    """The convex hull of `points`, resampled to `count` points evenly spaced along its perimeter.

    The network's polygon mask is the minimum over the edges' half-planes, exact only for convex polygons; one
    backtracking edge of a raw outline would empty it."""
    hull = cv2.convexHull(np.asarray(points, np.float32)).reshape(-1, 2).astype(np.float64)
    closed = np.vstack([hull, hull[:1]])
    cumulative = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    samples = np.linspace(0.0, cumulative[-1], count, endpoint=False)
    return np.stack([np.interp(samples, cumulative, closed[:, axis]) for axis in (0, 1)], axis=1)


def _apply(matrices: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(B,2,3) affine matrices applied to (B,N,2) points."""
    return points @ matrices[:, :, :2].transpose(0, 2, 1) + matrices[:, None, :, 2]


def similarity_onto(moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """`moving` (N,2) mapped by the least-squares similarity onto `fixed`: pose and size removed, shape kept."""
    return transform_points(estimate_similarity(moving, fixed), moving)


def fusion_geometry(source_mesh: np.ndarray, target_mesh: np.ndarray, profile_degree: float) -> dict[str, np.ndarray]:
    """Everything the fusion network needs for the shape part, for one pair of meshes in crop pixels."""
    batch = fusion_geometry_batch(np.asarray(source_mesh)[None], np.asarray(target_mesh)[None], [profile_degree])
    return {name: value[0] for name, value in batch.items()}


def fusion_geometry_batch(source_meshes: np.ndarray, target_meshes: np.ndarray,
                          profile_degrees: Sequence[float] | np.ndarray,
                          device: str | None = None) -> dict[str, np.ndarray]:
    """``fusion_geometry`` for (B,468,2) meshes and B profile degrees, vectorised over the batch (one batched TPS
    solve, on ``device`` when that is a GPU); returns each output stacked (B, ...).

    The intermediate shape is (1 - p) * T + p * S', S' the source mesh similarity-aligned onto the target's.
    Two splines share its control points: intermediate -> target crop and intermediate -> source crop.
    """
    p = np.clip(np.asarray(profile_degrees, np.float64).reshape(-1) / 100.0, 0.0, 1.0)
    target_mesh = np.asarray(target_meshes, np.float64)
    source_mesh = np.asarray(source_meshes, np.float64)
    aligned_source = _apply(estimate_similarities(source_mesh, target_mesh), source_mesh)
    # Points above the brows (forehead, hairline) keep the target's shape: the mask leaves them to the target,
    # so moving them would only drag hair and background around.
    brows = target_mesh[:, list(BROW_TOPS)]
    brow_line = brows[:, :, 1].mean(axis=1) - 0.15 * (brows[:, :, 0].max(axis=1) - brows[:, :, 0].min(axis=1))
    weights = np.where(target_mesh[:, :, 1] < brow_line[:, None], 0.0, p[:, None])[:, :, None]
    fused_mesh = (1.0 - weights) * target_mesh + weights * aligned_source
    target_outline = np.stack([convex_outline(outline) for outline in brow_to_chin_outline(target_mesh)])
    fused_outline = np.stack([convex_outline(outline) for outline in brow_to_chin_outline(fused_mesh)])
    both_ovals = np.concatenate([mesh[:, list(FACE_OVAL)] for mesh in (target_mesh, fused_mesh)], axis=1)
    ring = np.concatenate([anchor_ring(both_ovals), np.broadcast_to(BORDER_ANCHORS, (len(p), *BORDER_ANCHORS.shape))],
                          axis=1)
    indices = list(CONTROL_INDICES)
    centres = np.concatenate([fused_mesh[:, indices], ring], axis=1)
    # The source's ring is the target ring carried back by the inverse alignment, so its surroundings follow.
    source_ring = _apply(estimate_similarities(aligned_source, source_mesh), ring)
    values = np.concatenate([np.concatenate([target_mesh[:, indices], ring], axis=1),
                             np.concatenate([source_mesh[:, indices], source_ring], axis=1)], axis=2)
    coefficients = fit_tps_batch(centres, values, device=device)
    return {
        "CONTROL_POINTS": centres.astype(np.float32),
        "WARP_COEFFICIENTS": coefficients.astype(np.float32),
        "FUSED_OUTLINE": fused_outline.astype(np.float32),
        "TARGET_OUTLINE": target_outline.astype(np.float32),
        "FUSED_MESH": fused_mesh.astype(np.float32),
    }


def synthetic_mesh(seed: int = 0, jitter: float = 0.5) -> np.ndarray:
    """A plausible stand-in mesh (468,2) around the canonical template: the silhouette on an ellipse, the brows on
    a line, the rest scattered inside. For export examples and tests that need geometry without the mesh model."""
    layout = np.random.default_rng(0)  # one layout for every seed: point i is the same feature in every mesh
    centre = np.array([CROP_SIZE / 2.0, CROP_SIZE * 0.56])
    half_axes = np.array([0.27, 0.36]) * CROP_SIZE
    mesh = np.empty((MESH_POINTS, 2))
    angles = np.linspace(-np.pi / 2, 1.5 * np.pi, len(FACE_OVAL), endpoint=False)  # top first, clockwise
    mesh[list(FACE_OVAL)] = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * half_axes
    brow_x = np.concatenate([np.linspace(-0.7, -0.15, 5), np.linspace(0.15, 0.7, 5)]) * half_axes[0]
    mesh[list(BROW_TOPS)] = np.stack([centre[0] + brow_x, np.full(10, centre[1] - 0.45 * half_axes[1])], 1)
    inner = [i for i in range(MESH_POINTS) if i not in set(FACE_OVAL) | set(BROW_TOPS)]
    radius, theta = np.sqrt(layout.uniform(0, 0.8, len(inner))), layout.uniform(0, 2 * np.pi, len(inner))
    mesh[inner] = centre + np.stack([np.cos(theta), np.sin(theta)], 1) * radius[:, None] * half_axes
    rng = np.random.default_rng(seed)
    # Each face differs by a smooth change of shape (width, jaw length) plus a little landmark noise.
    shape = np.array([1.0 + rng.uniform(-0.1, 0.1), 1.0 + rng.uniform(-0.08, 0.08)])
    return centre + (mesh - centre) * shape + rng.normal(0, jitter, mesh.shape)

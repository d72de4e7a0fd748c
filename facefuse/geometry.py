"""Geometry fusion in the canonical crop: the intermediate face shape for a profile degree, and the thin-plate
spline (TPS) warps that carry both crops onto it.

Preprocess solves the small TPS systems here (numpy); the fusion network only evaluates the splines on a
sampling grid (tensor ops), so the network stays free of linear solves and exports to TensorRT.
"""

from __future__ import annotations

import cv2
import numpy as np

from facefuse.alignment import CROP_SIZE, estimate_similarity, transform_points

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


def tps_kernel(distance_squared: np.ndarray) -> np.ndarray:
    """U(r) = r^2 log r, written on r^2 (0 at r = 0)."""
    return 0.5 * distance_squared * np.log(np.maximum(distance_squared, 1e-12))


def fit_tps(centres: np.ndarray, values: np.ndarray, regularisation: float = TPS_REGULARISATION) -> np.ndarray:
    """Solve the TPS through `centres` (K,2) taking `values` (K,D); returns (K+3, D): K kernel weights, then the
    affine part [1, x, y]. Coordinates are scaled to the unit crop first, so the system stays well conditioned."""
    scale = 1.0 / CROP_SIZE
    points = np.asarray(centres, np.float64) * scale
    count = len(points)
    distance_squared = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    system = np.zeros((count + 3, count + 3))
    system[:count, :count] = tps_kernel(distance_squared) + regularisation * np.eye(count)
    system[:count, count] = 1.0
    system[:count, count + 1:] = points
    system[count, :count] = 1.0
    system[count + 1:, :count] = points.T
    rhs = np.zeros((count + 3, values.shape[1]))
    rhs[:count] = np.asarray(values, np.float64)
    return np.linalg.solve(system, rhs)


def evaluate_tps(centres: np.ndarray, coefficients: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Evaluate a fitted TPS at (N,2) points (crop pixels); the numpy twin of the network's evaluation."""
    scale = 1.0 / CROP_SIZE
    query = np.asarray(points, np.float64) * scale
    kernel = tps_kernel(((query[:, None, :] - np.asarray(centres, np.float64)[None] * scale) ** 2).sum(-1))
    return kernel @ coefficients[:-3] + coefficients[-3] + query @ coefficients[-2:]


def anchor_ring(outline: np.ndarray, count: int = ANCHOR_COUNT, scale: float = 1.45) -> np.ndarray:
    """Fixed points on an ellipse around the face, where the warp must be the identity (background stays)."""
    centre = outline.mean(axis=0)
    half_axes = (outline.max(axis=0) - outline.min(axis=0)) / 2.0 * scale
    angles = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
    return centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * half_axes


def brow_to_chin_outline(mesh: np.ndarray) -> np.ndarray:
    """The silhouette cut at the eyebrows: points above the brow line are moved down onto it, so the mask
    leaves the forehead and hair to the target."""
    outline = mesh[list(FACE_OVAL)].astype(np.float64)
    brows = mesh[list(BROW_TOPS)].astype(np.float64)
    left, right = brows[:5].mean(axis=0), brows[5:].mean(axis=0)
    # A line through both brows, lifted a little so the brows themselves stay inside.
    lift = 0.12 * np.linalg.norm(right - left)
    direction = (right - left) / max(np.linalg.norm(right - left), 1e-6)
    normal = np.array([direction[1], -direction[0]])  # points up (towards smaller y) for an upright face
    offset = normal @ ((left + right) / 2.0) + lift
    height = outline @ normal - offset
    return outline - np.maximum(height, 0.0)[:, None] * normal


def convex_outline(points: np.ndarray, count: int = OUTLINE_POINTS) -> np.ndarray:
    """The convex hull of `points`, resampled to `count` points evenly spaced along its perimeter.

    The network's polygon mask is the minimum over the edges' half-planes, exact only for convex polygons; one
    backtracking edge of a raw outline would empty it."""
    hull = cv2.convexHull(np.asarray(points, np.float32)).reshape(-1, 2).astype(np.float64)
    closed = np.vstack([hull, hull[:1]])
    cumulative = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    samples = np.linspace(0.0, cumulative[-1], count, endpoint=False)
    return np.stack([np.interp(samples, cumulative, closed[:, axis]) for axis in (0, 1)], axis=1)


def similarity_onto(moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """`moving` (N,2) mapped by the least-squares similarity onto `fixed`: pose and size removed, shape kept."""
    return transform_points(estimate_similarity(moving, fixed), moving)


def fusion_geometry(source_mesh: np.ndarray, target_mesh: np.ndarray, profile_degree: float) -> dict[str, np.ndarray]:
    """Everything the fusion network needs for the shape part, for one pair of meshes in crop pixels.

    The intermediate shape is (1 - p) * T + p * S', S' the source mesh similarity-aligned onto the target's.
    Two splines share its control points: intermediate -> target crop and intermediate -> source crop.
    """
    p = float(np.clip(profile_degree / 100.0, 0.0, 1.0))
    target_mesh = np.asarray(target_mesh, np.float64)
    source_mesh = np.asarray(source_mesh, np.float64)
    aligned_source = similarity_onto(source_mesh, target_mesh)
    # Points above the brows (forehead, hairline) keep the target's shape: the mask leaves them to the target,
    # so moving them would only drag hair and background around.
    brows = target_mesh[list(BROW_TOPS)]
    brow_line = brows[:, 1].mean() - 0.15 * (brows[:, 0].max() - brows[:, 0].min())
    weights = np.where(target_mesh[:, 1] < brow_line, 0.0, p)[:, None]
    fused_mesh = (1.0 - weights) * target_mesh + weights * aligned_source
    target_outline = convex_outline(brow_to_chin_outline(target_mesh))
    fused_outline = convex_outline(brow_to_chin_outline(fused_mesh))
    both_ovals = np.vstack([mesh[list(FACE_OVAL)] for mesh in (target_mesh, fused_mesh)])
    ring = np.vstack([anchor_ring(both_ovals), BORDER_ANCHORS])
    indices = list(CONTROL_INDICES)
    centres = np.vstack([fused_mesh[indices], ring])
    # The source's ring is the target ring carried back by the inverse alignment, so its surroundings follow.
    source_ring = transform_points(estimate_similarity(aligned_source, source_mesh), ring)
    values = np.hstack([np.vstack([target_mesh[indices], ring]), np.vstack([source_mesh[indices], source_ring])])
    coefficients = fit_tps(centres, values)
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

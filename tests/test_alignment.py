"""The alignment math: similarity estimation, the template, the inverse mapping and the paste-back round trip."""

import numpy as np
import pytest

from facefuse.alignment import (
    CROP_SIZE,
    TEMPLATE,
    alignment_matrices,
    alignment_matrix,
    estimate_similarity,
    invert_affine,
    transform_points,
    warp_to_crop,
)
from facefuse.pipeline import paste_back


def _similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    angle = np.deg2rad(angle_deg)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rotation, [[tx], [ty]]])


@pytest.mark.parametrize("scale,angle,tx,ty", [(1.0, 0.0, 0.0, 0.0), (0.37, 23.0, 410.0, -12.5), (3.2, -170.0, 5, 9)])
def test_estimate_similarity_recovers_a_known_transform(scale, angle, tx, ty):
    truth = _similarity(scale, angle, tx, ty)
    points = np.random.default_rng(0).uniform(0, 500, size=(5, 2))
    estimated = estimate_similarity(points, transform_points(truth, points))
    np.testing.assert_allclose(estimated, truth, atol=1e-8)


def test_estimate_similarity_never_reflects():
    points = np.array([[0, 0], [10, 0], [5, 5], [2, 10], [8, 10]], dtype=float)
    mirrored = points * [-1, 1]
    matrix = estimate_similarity(points, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_estimate_similarity_rejects_degenerate_points():
    with pytest.raises(ValueError):
        estimate_similarity(np.ones((5, 2)), TEMPLATE)


def test_alignment_matrix_maps_landmarks_onto_the_template():
    truth = _similarity(0.25, 12.0, -30.0, -80.0)  # crop -> image is the inverse of this
    landmarks = transform_points(invert_affine(truth), TEMPLATE)
    matrix = alignment_matrix(landmarks)
    np.testing.assert_allclose(transform_points(matrix, landmarks), TEMPLATE, atol=1e-6)


def test_alignment_matrices_of_a_batch_are_each_faces_own():
    truths = [_similarity(angle, scale, dx, dy) for angle, scale, dx, dy in
              ((0.25, 12.0, -30.0, -80.0), (-0.4, 3.0, 10.0, 5.0), (1.2, 0.5, 200.0, -40.0))]
    landmarks = np.stack([transform_points(invert_affine(truth), TEMPLATE) for truth in truths])
    matrices = alignment_matrices(landmarks)
    assert matrices.shape == (3, 2, 3)
    for face, matrix in zip(landmarks, matrices):
        np.testing.assert_allclose(matrix, alignment_matrix(face), atol=1e-9)
        np.testing.assert_allclose(transform_points(matrix, face), TEMPLATE, atol=1e-6)
    assert not np.allclose(matrices[0], matrices[1])  # each its own, not the first repeated


def test_template_is_a_plausible_face_inside_the_crop():
    left_eye, right_eye, nose, mouth_left, mouth_right = TEMPLATE
    assert left_eye[0] < nose[0] < right_eye[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    eye_distance = right_eye[0] - left_eye[0]
    # Room for forehead above the eyes and the chin below the mouth.
    assert left_eye[1] > 0.9 * eye_distance and CROP_SIZE - mouth_left[1] > 0.5 * eye_distance


def test_inverse_mapping_round_trip():
    matrix = _similarity(1.7, 33.0, 12.0, -40.0)
    points = np.random.default_rng(1).uniform(-100, 900, size=(50, 2))
    back = transform_points(invert_affine(matrix), transform_points(matrix, points))
    np.testing.assert_allclose(back, points, atol=1e-9)


def test_crop_then_paste_back_reproduces_the_image():
    """Warp a face-sized region into the crop and paste it back with a full mask: the pixels come back."""
    rng = np.random.default_rng(2)
    # A smooth image, so bilinear resampling error stays small.
    small = rng.uniform(0, 255, size=(24, 32, 3)).astype(np.float32)
    image = np.clip(np.kron(small, np.ones((20, 20, 1))), 0, 255).astype(np.uint8)
    import cv2

    image = cv2.GaussianBlur(image, (0, 0), 6)
    matrix = _similarity(1.4, 17.0, -150.0, -90.0)
    crop = warp_to_crop(image, matrix).astype(np.float32) / 255.0
    mask = np.zeros((1, CROP_SIZE, CROP_SIZE), np.float32)
    mask[:, 16:-16, 16:-16] = 1.0
    pasted = paste_back(image, crop.transpose(2, 0, 1), mask, matrix)
    footprint = cv2.warpAffine(mask[0], invert_affine(matrix), image.shape[1::-1]) > 0.999
    assert footprint.sum() > 5000
    error = np.abs(pasted.astype(float) - image.astype(float))[footprint]
    assert error.mean() < 1.0 and error.max() < 12
    assert np.array_equal(pasted[~(cv2.dilate(footprint.astype(np.uint8), np.ones((5, 5))) > 0)],
                          image[~(cv2.dilate(footprint.astype(np.uint8), np.ones((5, 5))) > 0)])

"""Our MTCNN on the sample photos: counts, landmark geometry, scale behaviour, the max_side mapping, edge cases."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from facefuse import detection
from facefuse.detection import DetectedFace, FaceDetector, nms
from facefuse.samples import SAMPLE_IMAGES, sample_image_path

# ArcFace's 112x112 5-point template; the Tom Hanks sample is a crop aligned to it.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def _load(name: str) -> np.ndarray:
    return np.asarray(Image.open(sample_image_path(name)).convert("RGB"))


@pytest.fixture(scope="module")
def group() -> np.ndarray:
    return _load("t1.jpg")


@pytest.fixture(scope="module")
def hanks() -> np.ndarray:
    return _load("Tom_Hanks_54745.png")


@pytest.fixture(scope="module")
def group_faces(detector, group) -> list[DetectedFace]:
    return detector.detect(group)


@pytest.fixture(scope="module")
def hanks_faces(detector, hanks) -> list[DetectedFace]:
    return detector.detect(hanks)


def _assert_plausible(face: DetectedFace) -> None:
    assert face.box.shape == (4,) and face.box.dtype == np.float32
    assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
    x1, y1, x2, y2 = face.box
    assert x2 > x1 and y2 > y1
    pts = face.landmarks
    assert np.all((pts[:, 0] > x1) & (pts[:, 0] < x2) & (pts[:, 1] > y1) & (pts[:, 1] < y2)), (face.box, pts)
    left_eye, right_eye, nose, mouth_left, mouth_right = pts
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    # Eyes above nose above mouth, both in image y and along the face's own down axis (robust to head tilt).
    assert (left_eye[1] + right_eye[1]) / 2 < nose[1] < (mouth_left[1] + mouth_right[1]) / 2
    eye_axis = right_eye - left_eye
    down = np.array([-eye_axis[1], eye_axis[0]])
    depth = pts @ down
    assert max(depth[0], depth[1]) < depth[2] < min(depth[3], depth[4])


def _nearest_box(box: np.ndarray, boxes: list[np.ndarray]) -> np.ndarray:
    centre = (box[:2] + box[2:]) / 2
    return min(boxes, key=lambda b: float(np.linalg.norm((b[:2] + b[2:]) / 2 - centre)))


def _assert_box_close(actual: np.ndarray, expected: np.ndarray, rel: float) -> None:
    side = float(max(expected[2] - expected[0], expected[3] - expected[1]))
    assert np.abs(actual - expected).max() <= rel * side, (actual, expected)


def test_samples_are_found():
    assert SAMPLE_IMAGES == ("t1.jpg", "Tom_Hanks_54745.png")
    for name in SAMPLE_IMAGES:
        assert sample_image_path(name).is_file()
    with pytest.raises(FileNotFoundError):
        sample_image_path("no_such_image.png")
    with pytest.raises(ValueError):
        sample_image_path("../images/t1.jpg")


@pytest.mark.parametrize("name,net", [("pnet", detection.PNet), ("rnet", detection.RNet), ("onet", detection.ONet)])
def test_our_nets_match_the_shipped_state_dicts(name, net):
    state = torch.load(detection._weights_dir() / f"{name}.pt", map_location="cpu", weights_only=True)
    assert list(net().state_dict()) == list(state)
    assert {k: tuple(v.shape) for k, v in net().state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_group_photo_has_six_confident_faces_largest_first(group_faces):
    assert len(group_faces) == 6
    assert all(face.score > 0.9 for face in group_faces)
    areas = [face.area for face in group_faces]
    assert areas == sorted(areas, reverse=True)
    for face in group_faces:
        _assert_plausible(face)


def test_single_face_photo(hanks_faces):
    assert len(hanks_faces) == 1
    face = hanks_faces[0]
    assert face.score > 0.9
    _assert_plausible(face)


def test_landmarks_land_on_the_aligned_template(hanks_faces):
    # The sample is an ArcFace-aligned crop: a swapped x/y convention or a wrong order would miss by tens of px.
    error = np.linalg.norm(hanks_faces[0].landmarks - ARCFACE_TEMPLATE, axis=1)
    assert error.max() < 12.0 and error.mean() < 7.0, error


def test_faceless_images_give_nothing(detector):
    assert detector.detect(np.full((480, 640, 3), 128, dtype=np.uint8)) == []
    noise = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    assert detector.detect(noise) == []


@pytest.mark.parametrize("shape", [(0, 0, 3), (1, 1, 3), (11, 11, 3), (12, 12, 3), (20, 20, 3), (5, 400, 3)])
def test_tiny_images_give_nothing(detector, shape):
    assert detector.detect(np.zeros(shape, dtype=np.uint8)) == []


@pytest.mark.parametrize("bad", [np.zeros((40, 40), np.uint8), np.zeros((40, 40, 4), np.uint8),
                                 np.zeros((40, 40, 3), np.float32), [[0, 0, 0]]])
def test_rejects_anything_but_hxwx3_uint8(detector, bad):
    with pytest.raises(ValueError):
        detector.detect(bad)


def test_upscaled_photo_gives_scaled_boxes(detector, hanks, hanks_faces):
    big = cv2.resize(hanks, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    faces = detector.detect(big)
    assert len(faces) == 1
    _assert_box_close(faces[0].box / 2, hanks_faces[0].box, rel=0.06)
    assert np.abs(faces[0].landmarks / 2 - hanks_faces[0].landmarks).max() < 4.0


def test_upscaled_group_goes_through_max_side_and_maps_back(detector, group, group_faces):
    # 2560 px wide exceeds max_side=1280, so this also exercises the downscale and the mapping back.
    big = cv2.resize(group, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    halved = [face.box / 2 for face in detector.detect(big) if face.score > 0.9]
    assert len(halved) == 6
    for face in group_faces:
        _assert_box_close(_nearest_box(face.box, halved), face.box, rel=0.06)


def test_face_on_a_large_canvas_is_found_at_its_offset(detector, hanks, hanks_faces):
    canvas = np.full((2000, 3000, 3), 110, dtype=np.uint8)
    ox, oy = 1700, 900
    canvas[oy:oy + hanks.shape[0], ox:ox + hanks.shape[1]] = hanks
    faces = detector.detect(canvas)
    assert len(faces) == 1
    shift = np.array([ox, oy, ox, oy], dtype=np.float32)
    # The face is only ~48 px after the 3000 -> 1280 downscale, hence the looser tolerance.
    _assert_box_close(faces[0].box - shift, hanks_faces[0].box, rel=0.1)
    assert np.abs(faces[0].landmarks - shift[:2] - hanks_faces[0].landmarks).max() < 6.0


def test_detect_batch_matches_single_calls(detector, group, hanks, group_faces, hanks_faces):
    blank = np.full((100, 100, 3), 200, dtype=np.uint8)
    batch = detector.detect_batch([hanks, blank, group])
    assert [len(faces) for faces in batch] == [1, 0, 6]
    for got, want in zip(batch[0] + batch[2], hanks_faces + group_faces):
        np.testing.assert_allclose(got.box, want.box, atol=1e-2)
        np.testing.assert_allclose(got.landmarks, want.landmarks, atol=1e-2)
        assert got.score == pytest.approx(want.score, abs=1e-4)
    assert detector.detect_batch([]) == []


def test_deterministic(detector, group, group_faces):
    again = detector.detect(group)
    assert [f.to_json() for f in again] == [f.to_json() for f in group_faces]
    for a, b in zip(again, group_faces):
        assert np.array_equal(a.box, b.box) and np.array_equal(a.landmarks, b.landmarks) and a.score == b.score


def test_to_json_and_area():
    face = DetectedFace(box=np.array([10.04, 20.06, 30.0, 60.0], np.float32), score=0.987654,
                        landmarks=np.arange(10, dtype=np.float32).reshape(5, 2) + 0.04)
    data = face.to_json()
    assert data == {"box": [10.0, 20.1, 30.0, 60.0], "score": 0.9877,
                    "landmarks": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]}
    json.dumps(data)  # plain Python numbers only
    assert face.area == pytest.approx((30.0 - 10.04) * (60.0 - 20.06), rel=1e-5)


@pytest.mark.parametrize("height", [12, 13, 40, 171, 172, 181, 182, 183, 300, 433])
def test_pnet_strips_equal_one_pass(detector, height):
    x = torch.from_numpy(np.random.default_rng(height).uniform(-1, 1, (1, 3, height, 768)).astype(np.float32))
    with torch.inference_mode():
        whole = detector.pnet(x)
        strips = detector._run_pnet(x)
    for a, b in zip(whole, strips):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_nms_fast_path_equals_reference():
    rng = np.random.default_rng(1)
    for n, max_side in [(1, 50), (7, 50), (300, 40), (600, 300)]:
        xy = np.round(rng.uniform(0, 800, (n, 2)) / 4) * 4  # on a grid, like P-Net proposals: many exact ties
        boxes = np.concatenate([xy, xy + rng.uniform(12, max_side, (n, 2))], axis=1)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for mode in ("union", "min"):
            for threshold in (0.0, 0.5, 0.7, 1.0):
                fast = detection._greedy_sparse(boxes, areas, threshold, mode)
                np.testing.assert_array_equal(fast, detection._greedy_loop(boxes, areas, threshold, mode))
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [2, 2, 5, 5]], dtype=float)
    assert nms(boxes, np.array([0.9, 0.8, 0.7, 0.95]), 0.5).tolist() == [3, 0, 2]
    assert nms(boxes, np.array([0.9, 0.8, 0.7, 0.95]), 0.5, mode="min").tolist() == [3, 2]


@pytest.mark.parametrize("rounds", [64, 2, 0], ids=["rounds", "rounds then loop", "loop only"])
def test_greedy_rounds_equal_the_sequential_greedy_pass(rounds, monkeypatch):
    """The vectorised greedy pass keeps exactly what the box-by-box one keeps, also when it has to finish box by
    box (few rounds allowed) and on long chains of overlapping boxes."""
    monkeypatch.setattr(detection, "_GREEDY_ROUNDS", rounds)
    rng = np.random.default_rng(21)
    for trial in range(40):
        n = int(rng.integers(1, 400))
        if trial % 4 == 0:  # one long chain: each box hits the next (the worst case for rounds)
            first = np.arange(n - 1)
            second = first + 1
        else:
            count = int(rng.integers(0, 4 * n))
            a, b = rng.integers(0, n, count), rng.integers(0, n, count)
            first, second = np.minimum(a, b), np.maximum(a, b)
            keep = first < second
            first, second = first[keep], second[keep]
            order = np.argsort(first, kind="stable")
            first, second = first[order], second[order]
        expected = detection._greedy_from_pairs_loop(n, first, second)
        np.testing.assert_array_equal(detection._greedy_from_pairs(n, first, second), expected)
    chain = detection._greedy_from_pairs(5, np.arange(4), np.arange(1, 5))
    np.testing.assert_array_equal(chain, [0, 2, 4])  # 0 kept, 1 suppressed, 2 kept, ...


def test_grouped_nms_equals_nms_per_group():
    rng = np.random.default_rng(7)
    n = 900
    xy = np.round(rng.uniform(0, 300, (n, 2)) / 4) * 4
    boxes = np.concatenate([xy, xy + rng.uniform(12, 80, (n, 2))], axis=1)
    scores = np.round(rng.uniform(0.5, 1.0, n), 2)  # coarse: many ties, resolved by input order
    groups = rng.integers(0, 9, n) * 3  # gaps between group numbers are allowed
    for mode in ("union", "min"):
        expected = np.concatenate([np.flatnonzero(groups == g)[nms(boxes[groups == g], scores[groups == g], 0.5, mode)]
                                   for g in np.unique(groups)])
        np.testing.assert_array_equal(detection.nms_grouped(boxes, scores, groups, 0.5, mode), expected)
    assert detection.nms_grouped(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5).shape == (0,)


def _reference_proposals(image_ids, levels, cells, boxes, scores, offsets):
    # The textbook two NMS passes (per level of each image, then per image), as nms_grouped computes them.
    keep = detection.nms_grouped(boxes, scores, image_ids * (int(levels.max()) + 1) + levels, 0.5)
    image_ids, boxes, scores, offsets = image_ids[keep], boxes[keep], scores[keep], offsets[keep]
    keep = detection.nms_grouped(boxes, scores, image_ids, 0.7)
    return detection._square(detection._regress(boxes[keep], offsets[keep])), image_ids[keep]


@pytest.mark.parametrize("level_ratio", [0.709, 0.9])  # 0.9: levels close enough for the second pass to matter
def test_pnet_proposals_from_the_grid_equal_two_nms_passes(level_ratio):
    rng = np.random.default_rng(3)
    parts = []
    for image in range(3):
        for level in range(4):
            scale = 0.6 * level_ratio ** level
            mask = rng.uniform(size=(40, 60)) < 0.3
            cells = np.argwhere(mask)
            x1, y1 = cells[:, 1] * (2 / scale), cells[:, 0] * (2 / scale)
            boxes = np.stack([x1, y1, x1 + 12 / scale, y1 + 12 / scale], axis=1)
            scores = np.round(rng.uniform(0.6, 1.0, len(cells)), 2)  # ties, resolved by input order
            parts.append((np.full(len(cells), image), np.full(len(cells), level), cells, boxes, scores,
                          rng.normal(0, 0.1, (len(cells), 4))))
    windows = [np.concatenate(column) for column in zip(*parts)]
    proposals, ids = detection._pnet_proposals(*windows)
    expected, expected_ids = _reference_proposals(*windows)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(proposals, expected)
    assert detection._levels_may_overlap(windows[0], windows[1], windows[3], 0.7) == (level_ratio > 0.8)


def test_neighbour_pairs_found_on_the_device_equal_the_host_ones():
    """The device path finds P-Net's grid-neighbour pairs from the output mask; the same pairs as the host's search
    over the windows' cells (so the level NMS after it is the same)."""
    rng = np.random.default_rng(8)
    masks = [torch.from_numpy(rng.uniform(size=shape) < density)
             for shape, density in (((3, 17, 23), 0.3), ((2, 1, 9), 0.6), ((1, 30, 2), 0.5), ((2, 5, 5), 0.0))]
    offset, device_pairs, parts = 0, [], []
    for level, mask in enumerate(masks):
        where = mask.nonzero()
        device_pairs.append(detection._grid_neighbour_pairs(where, tuple(mask.shape), offset, 0.5))
        offset += len(where)
        parts.append((where[:, 0].numpy() * 10 + level, where[:, 1:].numpy()))  # group: image and level
    groups, cells = (np.concatenate(column) for column in zip(*parts))
    found = torch.cat(device_pairs).numpy()
    expected = detection._grid_neighbours(groups, cells, 0.5)
    assert len(found) == len(expected) > 100
    assert sorted(map(tuple, np.sort(found, axis=1))) == sorted(map(tuple, np.sort(expected, axis=1)))


@pytest.mark.parametrize("min_face_size", [12, 48])
def test_other_min_face_sizes_still_find_the_group(group, group_faces, min_face_size):
    faces = [f for f in FaceDetector(min_face_size=min_face_size).detect(group) if f.score > 0.9]
    assert len(faces) == 6
    for face in group_faces:
        _assert_box_close(_nearest_box(face.box, [f.box for f in faces]), face.box, rel=0.1)


def test_small_max_side_maps_back(group, group_faces):
    faces = FaceDetector(max_side=640).detect(group)
    assert len([f for f in faces if f.score > 0.9]) == 6
    for face in group_faces:
        _assert_box_close(_nearest_box(face.box, [f.box for f in faces]), face.box, rel=0.1)


@pytest.mark.parametrize("kwargs", [{"min_face_size": 8}, {"max_side": 10}, {"thresholds": (0.6, 0.7)},
                                    {"thresholds": (0.6, 0.7, 1.5)}])
def test_constructor_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        FaceDetector(**kwargs)


def test_faces_are_listed_largest_first_with_eyes_and_mouth_corners_by_x():
    # _to_faces orders and fixes every face at once; the rule as it reads, face by face, must give the same list.
    rng = np.random.default_rng(1)
    for trial in range(200):
        count = int(rng.integers(0, 12))
        boxes = rng.uniform(0, 100, (count, 4)).round(int(rng.integers(0, 3)))
        if trial % 3 == 0 and count:
            boxes[: count // 2] = boxes[0]  # equal areas: score, then position decide
        scores = rng.uniform(0.9, 1.0, count).round(int(rng.integers(1, 4)))
        landmarks = rng.uniform(0, 100, (count, 5, 2))
        expected = []
        for box, score, points in zip(boxes, scores, landmarks):
            points = points.copy()
            for a, b in ((0, 1), (3, 4)):
                if points[a, 0] > points[b, 0]:
                    points[[a, b]] = points[[b, a]]
            expected.append(DetectedFace(box.astype(np.float32), float(score), points.astype(np.float32)))
        expected.sort(key=lambda face: (-face.area, -face.score, float(face.box[0]), float(face.box[1])))
        faces = detection._to_faces(boxes, scores, landmarks)
        assert [face.to_json() for face in faces] == [face.to_json() for face in expected]
        for face, reference in zip(faces, expected):
            assert np.array_equal(face.box, reference.box) and np.array_equal(face.landmarks, reference.landmarks)

"""BlazeFace full-range through our TFLite graph runner, and MTCNN with BlazeFace proposals (detector_proposals =
"blazeface"): the same faces as the full cascade on the sample photos, landmarks close to it, P-Net's proposals for
a photo in which BlazeFace sees nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from facefuse.blazeface import BlazeFace, model_path, weighted_nms, weighted_nms_grouped
from facefuse.detection import FaceDetector, box_overlap
from facefuse.samples import sample_image_path
from facefuse.tflite_graph import TFLiteGraph, _conv_same, _same_padding


def _photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(sample_image_path(name)).convert("RGB"))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def cascade_faces():
    return FaceDetector(max_side=640).detect(_photo("t1.jpg"))


def test_same_padding_is_tensorflows():
    assert _same_padding(192, 3, 2) == (0, 1)  # 96 outputs need one extra column, all of it after
    assert _same_padding(96, 3, 1) == (1, 1)
    assert _same_padding(48, 2, 2) == (0, 0)
    assert _same_padding(7, 5, 2) == (2, 2)


def test_weighted_nms_merges_overlaps_by_score_and_keeps_the_rest():
    rows = np.array([[0, 0, 10, 10, 0.9] + [0] * 12,
                     [1, 1, 11, 11, 0.3] + [4] * 12,
                     [50, 50, 60, 60, 0.8] + [1] * 12], dtype=np.float64)
    merged = weighted_nms(rows)
    assert len(merged) == 2
    np.testing.assert_allclose(merged[0, :4], [0.25, 0.25, 10.25, 10.25])  # (0.9 * 0 + 0.3 * 1) / 1.2
    assert merged[0, 4] == 0.9 and merged[0, 5] == pytest.approx(1.0)
    np.testing.assert_allclose(merged[1], rows[2])


def _weighted_nms_one_by_one(rows: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """MediaPipe's weighted NMS as it reads: the best remaining row, the rows overlapping it, their weighted mean."""
    rows = rows[np.argsort(-rows[:, 4], kind="stable")]
    kept = []
    while len(rows):
        areas = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1])
        overlap = box_overlap(rows[0, :4], areas[0], rows[:, :4], areas, "union") > threshold
        overlap[0] = True
        group = rows[overlap]
        merged = (group * group[:, 4:5]).sum(axis=0) / group[:, 4].sum()
        merged[4] = group[0, 4]
        kept.append(merged)
        rows = rows[~overlap]
    return np.array(kept).reshape(-1, 17)


def test_weighted_nms_of_many_photos_at_once_is_each_photos_own():
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 7, 400)
    groups[groups == 5] = 6  # a photo with no rows
    centres = rng.uniform(0, 1, (400, 2)) * [[1.0, 0.2]] + groups[:, None] * 0.01  # crowded: chains of overlaps
    sizes = rng.uniform(0.02, 0.1, (400, 1))
    scores = rng.uniform(0.15, 1.0, (400, 1)).round(2)  # ties: input order decides
    rows = np.hstack([centres - sizes / 2, centres + sizes / 2, scores, rng.uniform(0, 1, (400, 12))])
    kept, kept_groups = weighted_nms_grouped(rows, groups)
    assert np.all(np.diff(kept_groups) >= 0)
    for group in range(8):
        expected = _weighted_nms_one_by_one(rows[groups == group])
        assert expected.shape == kept[kept_groups == group].shape
        np.testing.assert_allclose(kept[kept_groups == group], expected, rtol=1e-12, atol=1e-15)
    assert len(expected := weighted_nms(rows[groups == 0])) > 3  # the one-photo form: the same rows
    np.testing.assert_allclose(expected, kept[kept_groups == 0], rtol=1e-12, atol=1e-15)
    empty, empty_groups = weighted_nms_grouped(np.zeros((0, 17)), np.zeros(0, dtype=np.int64))
    assert empty.shape == (0, 17) and empty_groups.shape == (0,)


def test_blazeface_finds_the_group_photos_faces(cascade_faces):
    rows = BlazeFace().detect_batch([_photo("t1.jpg")])[0]
    assert len(rows) == len(cascade_faces) == 6
    for face in cascade_faces:
        assert max(_iou(face.box, row[:4]) for row in rows) > 0.5


def test_blazeface_proposals_give_the_cascades_faces_and_landmarks(cascade_faces):
    detector = FaceDetector(max_side=640, proposals="blazeface")
    group, hanks = detector.detect_batch([_photo("t1.jpg"), _photo("Tom_Hanks_54745.png")])
    assert len(group) == len(cascade_faces)
    for face in cascade_faces:
        eye_distance = np.linalg.norm(face.landmarks[0] - face.landmarks[1])
        closest = min(group, key=lambda other: np.abs(other.landmarks - face.landmarks).max())
        assert np.abs(closest.landmarks - face.landmarks).max() < 0.25 * eye_distance
        assert closest.score > 0.9
    # The aligned 112 px crop is one face filling the frame: BlazeFace's full-range model sees none, P-Net does.
    assert BlazeFace().detect_batch([_photo("Tom_Hanks_54745.png")])[0].shape[0] == 0
    assert len(hanks) == 1


def test_bad_proposal_choices_are_refused():
    with pytest.raises(ValueError, match="proposals must be one of"):
        FaceDetector(proposals="yolo")


def test_auto_proposals_are_blazeface_on_both_paths():
    assert FaceDetector(proposals="auto").proposals == "blazeface"
    assert FaceDetector(proposals="auto", images_on_device=True).proposals == "blazeface"
    assert FaceDetector().proposals == "mtcnn"  # the plain class keeps the full cascade


def test_device_path_blazeface_gives_the_host_paths_faces(cascade_faces):
    """Letterbox, BlazeFace, R-/O-Net crops all on the device (here the CPU's torch, as on the GPU): the host path's
    faces and landmarks, and P-Net's fallback for the aligned crop BlazeFace does not see."""
    photos = [_photo("t1.jpg"), _photo("Tom_Hanks_54745.png"), _photo("t1.jpg")[:, ::-1]]
    host = FaceDetector(max_side=640, proposals="blazeface").detect_batch(photos)
    device_detector = FaceDetector(max_side=640, proposals="blazeface", images_on_device=True)
    assert device_detector.blazeface.net is not None  # the PyTorch graph, on the detector's device
    device = device_detector.detect_batch([torch.from_numpy(np.array(photo)) for photo in photos])
    assert [len(faces) for faces in device] == [len(faces) for faces in host] == [6, 1, 6]
    for host_faces, device_faces in zip(host, device):
        for face in host_faces:
            eye_distance = np.linalg.norm(face.landmarks[0] - face.landmarks[1])
            closest = min(device_faces, key=lambda other: np.abs(other.landmarks - face.landmarks).max())
            assert np.abs(closest.landmarks - face.landmarks).max() < 0.1 * eye_distance


def test_blazeface_on_tensors_gives_the_rows_of_host_photos():
    """detect_tensors (device letterbox, threshold on the device) and detect_batch (OpenCV letterbox) agree; photos
    of two sizes go through in one pass."""
    group, hanks = _photo("t1.jpg"), _photo("Tom_Hanks_54745.png")
    wide = np.ascontiguousarray(np.concatenate([group, group[:, ::-1]], axis=1))
    blazeface = BlazeFace(runtime="torch", pad_batches=True)  # padded as on the GPU
    host_rows = blazeface.detect_batch([group, wide, hanks])
    batches = [torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() for photo in (group, wide)]
    tensor_rows = blazeface.detect_tensors(batches)
    assert len(tensor_rows) == 2 and len(tensor_rows[0]) == len(host_rows[0]) == 6
    # Faces the model is sure of match both ways (the two letterboxes resample differently: borderline faces of
    # the half-size wide photo may fall on either side of the threshold).
    for first, second in ((host_rows, tensor_rows), (tensor_rows, host_rows)):
        for rows, others in zip(first[:2], second[:2]):
            sure = rows[rows[:, 4] > 0.6]  # the group photo's scores run 0.53-0.91, the wide one's 0.51-0.76
            assert len(sure) >= 2
            for row in sure:
                closest = others[np.argmin(np.abs(others[:, :4] - row[:4]).max(axis=1))]
                assert np.abs(closest[:4] - row[:4]).max() < 0.05 * (row[2] - row[0])
                assert abs(closest[4] - row[4]) < 0.1
    with pytest.raises(ValueError, match="runtime='torch'"):
        BlazeFace(runtime="onnxruntime").detect_tensors(batches)


def test_blazeface_proposals_keep_every_confident_face_of_the_benchmark_photos():
    """1080p views of the group photo (bench.inputs): every face the full cascade finds with score > 0.95 is found
    (with BlazeFace's score threshold at 0.5 a sixth of them were lost; R-Net and O-Net now do the filtering)."""
    from bench.inputs import benchmark_pairs
    from facefuse.imaging import decode_image

    photos = [decode_image(data) for pair in benchmark_pairs(2) for data in pair]
    cascade = FaceDetector(max_side=640).detect_batch(photos)
    proposed = FaceDetector(max_side=640, proposals="blazeface").detect_batch(photos)
    confident = 0
    for full, fast in zip(cascade, proposed):
        for face in (face for face in full if face.score > 0.95):
            confident += 1
            width = face.box[2] - face.box[0]
            assert any(np.abs(other.box - face.box).max() < 0.3 * width for other in fast), face.box
    assert confident >= 20


def test_onnx_runtime_and_pytorch_give_the_same_faces():
    """On the CPU the graph runs in ONNX Runtime (exported from our PyTorch runner): the same rows as PyTorch's."""
    photo = _photo("t1.jpg")
    fast, plain = BlazeFace(), BlazeFace(runtime="torch")
    assert fast.session is not None and plain.session is None
    rows_fast, rows_plain = fast.detect_batch([photo])[0], plain.detect_batch([photo])[0]
    assert rows_fast.shape == rows_plain.shape
    np.testing.assert_allclose(rows_fast, rows_plain, atol=0.05)  # pixels; scores within 1e-4
    with pytest.raises(ValueError, match="runtime must be"):
        BlazeFace(runtime="tflite")


@pytest.mark.parametrize(("size", "kernel", "stride"), [(24, 3, 1), (24, 5, 1), (24, 3, 2), (23, 3, 2), (12, 1, 1)])
def test_same_convolution_without_a_padded_copy_gives_the_padded_sums(size, kernel, stride):
    """SAME padding as the convolution's own zero padding where it is symmetric (no padded copy of the input), an
    explicit pad where it is not: the same values as padding first, bit for bit (CPU)."""
    rng = np.random.default_rng(size + kernel + stride)
    x = torch.from_numpy(rng.normal(size=(2, 4, size, size + 1)).astype(np.float32))
    weight = torch.from_numpy(rng.normal(size=(4, 1, kernel, kernel)).astype(np.float32))
    bias = torch.from_numpy(rng.normal(size=4).astype(np.float32))
    top, bottom = _same_padding(size, kernel, stride)
    left, right = _same_padding(size + 1, kernel, stride)
    want = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride=stride, groups=4)
    assert torch.equal(_conv_same(x, weight, bias, (stride, stride), groups=4), want)


def test_blazeface_graph_pads_only_where_padding_is_asymmetric_or_adds_channels(monkeypatch):
    """On the GPU every F.pad is a fill and a copy kernel: of BlazeFace's 43 SAME-padded convolutions only the 5
    stride-2 ones pad a copy of their input (36 pad inside the convolution, 2 need no padding), plus the graph's 8
    channel PADs: 13 pads per pass instead of 49."""
    calls = []
    pad = F.pad

    def counting_pad(x, pads, *args, **kwargs):
        calls.append(tuple(pads))
        return pad(x, pads, *args, **kwargs)

    graph = TFLiteGraph(model_path()).eval()
    monkeypatch.setattr(F, "pad", counting_pad)
    with torch.inference_mode():
        graph(torch.zeros((1, 3, 192, 192)))
    assert sorted(set(calls)) == [(0, 0, 0, 0, 0, extra) for extra in (16, 32, 48, 64, 128)] + [(0, 1, 0, 1)]
    assert len(calls) == 13

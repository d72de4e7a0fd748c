"""Benchmark inputs: 1080p JPEGs made from the shipped group photo, and perf_analyzer's --input-data JSON."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import cv2
import numpy as np

from facefuse.imaging import decode_image, encode_image
from facefuse.samples import sample_image_path

FULL_HD = (1920, 1080)


def full_hd(rgb: np.ndarray) -> np.ndarray:
    """Scale to cover 1920x1080 and centre-crop: a 1080p photo with the sample's faces at a realistic size."""
    width, height = FULL_HD
    scale = max(width / rgb.shape[1], height / rgb.shape[0])
    resized = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)),
                         interpolation=cv2.INTER_CUBIC)
    top, left = (resized.shape[0] - height) // 2, (resized.shape[1] - width) // 2
    return np.ascontiguousarray(resized[top:top + height, left:left + width])


def benchmark_pair() -> tuple[bytes, bytes]:
    """(source, target) 1080p JPEGs (q90): the group photo and its mirror image, so they are different files."""
    group = full_hd(decode_image(sample_image_path("t1.jpg").read_bytes()))
    return encode_image(np.ascontiguousarray(group[:, ::-1]), "jpeg", 90), encode_image(group, "jpeg", 90)


def benchmark_pairs(count: int) -> list[tuple[bytes, bytes]]:
    """``count`` different (source, target) 1080p JPEG pairs: the group photo at slightly different zooms and
    offsets, each pair's source the mirror of another view.

    Every request of a benchmark carries different bytes, because preprocess decodes and detects identical images
    of a batch once: repeating one pair would measure that shortcut, not the service.
    """
    group = decode_image(sample_image_path("t1.jpg").read_bytes())
    rng = np.random.default_rng(1080)
    pairs = []
    for _ in range(count):
        views = []
        for _ in range(2):
            zoom = rng.uniform(1.0, 1.15)
            large = full_hd(cv2.resize(group, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC))
            shift_x, shift_y = rng.integers(-40, 41, 2)
            views.append(np.ascontiguousarray(np.roll(large, (int(shift_y), int(shift_x)), axis=(0, 1))))
        pairs.append((encode_image(np.ascontiguousarray(views[0][:, ::-1]), "jpeg", 90),
                      encode_image(views[1], "jpeg", 90)))
    return pairs


def _bytes_entry(data: bytes) -> dict[str, str]:
    # perf_analyzer reads a BYTES element given as b64 in Triton's serialised form: a 4-byte length, then the bytes.
    return {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode("ascii")}


def write_input_data(path: Path, pairs: list[tuple[bytes, bytes]], face_degree: float = 100.0,
                     profile_degree: float = 100.0, options: dict | None = None) -> Path:
    """perf_analyzer --input-data JSON for the face_fusion ensemble (and preprocess: same inputs); one entry per
    pair, which perf_analyzer sends in turn."""
    entries = []
    for source, target in pairs:
        entry = {
            "SOURCE_IMAGE": _bytes_entry(source),
            "TARGET_IMAGE": _bytes_entry(target),
            "FACE_DEGREE": {"content": [face_degree], "shape": [1]},
            "PROFILE_DEGREE": {"content": [profile_degree], "shape": [1]},
            "OPTIONS": _bytes_entry(json.dumps(options or {}).encode()),
        }
        for name in ("SOURCE_IMAGE", "TARGET_IMAGE", "OPTIONS"):
            entry[name]["shape"] = [1]
        entries.append(entry)
    path.write_text(json.dumps({"data": entries}))
    return path


def write_tensor_data(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """perf_analyzer --input-data JSON for a composing model from real intermediate tensors (one request)."""
    entry = {}
    for name, value in tensors.items():
        if value.dtype == object:
            entry[name] = {**_bytes_entry(bytes(value.reshape(-1)[0])), "shape": list(value.shape[1:])}
        elif value.dtype == np.uint8:  # an image: its raw bytes, not six million numbers in JSON
            entry[name] = {"b64": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii"),
                           "shape": list(value.shape[1:])}
        else:
            entry[name] = {"content": value.reshape(-1).astype(float).tolist(), "shape": list(value.shape[1:])}
    path.write_text(json.dumps({"data": [entry]}))
    return path

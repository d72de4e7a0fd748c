"""dlib's face-recognition ResNet: a 128-D identity descriptor for the face our MTCNN detector chose.

Used by the identity blocklist (facefuse/blocklist.py) and, for its model loading, by the evaluation's judge
(evaluation/dlib_models.py). The model files come from the ``face-recognition-models`` wheel; its ``__init__``
imports ``pkg_resources`` (gone from recent setuptools), so only its package folder is located, never imported.

How the descriptor is computed (measured by ``python -m build.blocklist_report``): dlib's 5-point shape predictor
runs inside a dlib-style rectangle derived from our MTCNN box, and the ResNet reads the 150x150 chip dlib cuts from
that shape. On the sample faces and their augmentations this agrees with dlib's own pipeline (HOG detector + 5-point
shape) to a mean descriptor distance of 0.07, while chips cut from our MTCNN landmarks differ by 0.2: the ResNet was
trained on chips aligned by dlib's own shape predictor, whose points are not MTCNN's.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from collections.abc import Sequence

import dlib
import numpy as np

MODEL_NAME = "dlib_face_recognition_resnet_model_v1"
DESCRIPTOR_SIZE = 128
MODEL_FILES = {
    "shape68": "shape_predictor_68_face_landmarks.dat",
    "shape5": "shape_predictor_5_face_landmarks.dat",
    "resnet": f"{MODEL_NAME}.dat",
    "mmod": "mmod_human_face_detector.dat",
}
SAME_PERSON_THRESHOLD = 0.6  # dlib's documented operating point for the ResNet descriptor (Euclidean distance)
# MTCNN box -> dlib rectangle, measured on the 7 sample faces: dlib's HOG square is ~1.08x the MTCNN width, ~0.83x
# its height, and centred ~7% of the height lower (dlib's boxes leave out the forehead).
BOX_TO_DLIB_WIDTH, BOX_TO_DLIB_HEIGHT, BOX_TO_DLIB_DROP = 1.08, 0.83, 0.07
_CHIP_PADDING = 0.25  # dlib's default, what the ResNet was trained with

Box = Sequence[float] | np.ndarray


def models_dir() -> pathlib.Path:
    """Folder holding the ``.dat`` files of the installed face-recognition-models wheel."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("face-recognition-models is not installed (pip install --no-deps "
                                "face-recognition-models==0.3.0)")
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    for folder in (root / "models", root):
        if (folder / MODEL_FILES["resnet"]).is_file():
            return folder
    raise FileNotFoundError(f"dlib model files not found under {root}")


def model_path(key: str) -> pathlib.Path:
    return models_dir() / MODEL_FILES[key]


@functools.lru_cache(maxsize=1)
def shape_predictor_5() -> dlib.shape_predictor:
    return dlib.shape_predictor(str(model_path("shape5")))


@functools.lru_cache(maxsize=1)
def face_recognizer() -> dlib.face_recognition_model_v1:
    return dlib.face_recognition_model_v1(str(model_path("resnet")))


def as_dlib_rgb(rgb: np.ndarray) -> np.ndarray:
    """dlib wants C-contiguous HxWx3 uint8 pixels."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {desc}")
    return np.ascontiguousarray(rgb)


def dlib_rectangle(box: Box) -> dlib.rectangle:
    """The rectangle dlib's HOG detector would give for the face in an MTCNN ``box`` (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = max(1.0, x2 - x1), max(1.0, y2 - y1)
    centre_x, centre_y = (x1 + x2) / 2.0, (y1 + y2) / 2.0 + BOX_TO_DLIB_DROP * height
    side = (BOX_TO_DLIB_WIDTH * width + BOX_TO_DLIB_HEIGHT * height) / 2.0
    return dlib.rectangle(*(int(round(v)) for v in (centre_x - side / 2, centre_y - side / 2,
                                                    centre_x + side / 2, centre_y + side / 2)))


def face_descriptor(rgb: np.ndarray, box: Box) -> np.ndarray:
    """128-D float32 descriptor of the face in an MTCNN ``box`` (about 100 ms on one CPU core)."""
    rgb = as_dlib_rgb(rgb)
    shape = shape_predictor_5()(rgb, dlib_rectangle(box))
    return np.asarray(face_recognizer().compute_face_descriptor(rgb, shape, 0, _CHIP_PADDING), np.float32)


def descriptor_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two descriptors; < 0.6 means 'same person' for dlib."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))

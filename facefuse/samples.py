"""Sample photos shipped inside the installed ``insightface`` package, used by tests and benchmarks.

``insightface`` itself is never imported (its ``__init__`` pulls in onnx/onnxruntime); only its package folder is
located, so the photos are usable wherever the wheel is installed.
"""

from __future__ import annotations

import importlib.util
import pathlib

SAMPLE_IMAGES = ("t1.jpg", "Tom_Hanks_54745.png")


def _insightface_images_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the insightface package is not installed; its sample images are unavailable")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "images"


def sample_image_path(name: str) -> pathlib.Path:
    """Path of one of insightface's bundled sample images, e.g. ``sample_image_path("t1.jpg")``."""
    if pathlib.PurePath(name).name != name:
        raise ValueError(f"sample image name must be a bare file name, got {name!r}")
    path = _insightface_images_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"sample image {name!r} not found at {path}")
    return path

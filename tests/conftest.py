"""Shared fixtures: the sample photos, generated images, and one real local Triton server per test session."""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facefuse.local_server import MODEL_REPOSITORY, free_port, free_ports, restricted_api_args, start, stop_process
from facefuse.samples import sample_image_path
from gateway.render import find_nginx

REPO_ROOT = Path(__file__).resolve().parent.parent
_free_port = free_port  # the name other test modules import


@pytest.fixture(scope="session")
def hanks_png() -> bytes:
    return sample_image_path("Tom_Hanks_54745.png").read_bytes()


@pytest.fixture(scope="session")
def group_jpg() -> bytes:
    return sample_image_path("t1.jpg").read_bytes()


def encode(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def faceless_png() -> bytes:
    """A 320x240 smooth colour gradient with some texture and no face."""
    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x * 255 / 320, y * 255 / 240, (x + y) * 255 / 560], axis=-1)
    rgb += np.random.default_rng(0).normal(0, 4, rgb.shape)
    return encode(np.clip(rgb, 0, 255).astype(np.uint8))



@pytest.fixture(scope="session")
def triton_server(tmp_path_factory):
    """The real Triton server from the nvidia-pytriton wheel on model_repository/, on free ports.

    Started as in docker compose: the restricted APIs need the admin header (`admin_secret`); health, metadata and
    inference do not, so the other live tests are unaffected and tests/test_gateway.py reuses this one server.
    """
    onnx_path = MODEL_REPOSITORY / "fusion" / "1" / "model.onnx"
    if not onnx_path.exists():
        from build.export_onnx import export, simplify

        raw = export(tmp_path_factory.mktemp("onnx") / "raw.onnx")
        simplify(raw, onnx_path)
    ports = free_ports()
    log_path = REPO_ROOT / "out" / "test-triton.log"
    log_path.parent.mkdir(exist_ok=True)
    log_path.write_text("")
    admin_secret = secrets.token_urlsafe(24)
    process = start(ports, log_path, quiet=True, extra=restricted_api_args(admin_secret))
    yield {"ports": ports, "log": log_path, "process": process, "admin_secret": admin_secret}
    stop_process(process)


def require_nginx() -> str:
    """Debian's nginx for the gateway tests: a clear failure if missing, a skip only with FACEFUSE_ALLOW_NO_NGINX=1."""
    nginx = find_nginx()
    if nginx is None:
        if os.environ.get("FACEFUSE_ALLOW_NO_NGINX") == "1":
            pytest.skip("nginx is not installed and FACEFUSE_ALLOW_NO_NGINX=1: the gateway is not tested")
        pytest.fail("nginx is not installed; the gateway tests need Debian's nginx: `apt-get install nginx-light` "
                    "(.ci/run installs it). Set FACEFUSE_ALLOW_NO_NGINX=1 to skip these tests instead.")
    return nginx

"""The GPU path's preprocessing code served by the real Triton on a CPU-only host: with the preprocess parameter
detector_images = "device" the photos are decoded into tensors, BlazeFace and the cascade run on tensor pyramids
and crops, and TARGET_RGB and the network's crops leave preprocess as tensors through DLPack, as on a GPU host (there
in GPU memory). It must serve what the host path serves, and fail bad input with the same codes."""

from __future__ import annotations

import numpy as np
import pytest

from client.api import FusionClient, FusionServerError
from facefuse import errors
from facefuse.imaging import decode_image
from facefuse.watermark import extract_watermark
from tests.servers import serve_patched_copy, set_parameter

pytestmark = pytest.mark.live
OPTIONS = {"target_face": 0, "format": "png", "watermark_id": "00000000c0ffee00"}


@pytest.fixture(scope="module")
def device_path_server(tmp_path_factory):
    yield from serve_patched_copy(tmp_path_factory.mktemp("device_path"), "test-device-path-triton.log",
                                  {"preprocess": set_parameter("detector_images", "device")})


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_device_path_serves_what_the_host_path_serves(device_path_server, triton_server, hanks_png, group_jpg,
                                                      protocol):
    log = device_path_server.log.read_text()
    assert "TARGET_RGB and crops as cpu tensors" in log  # the tensor handoff is what is being served
    ports = {"device": device_path_server.ports, "host": triton_server["ports"]}
    results = {}
    for name, server_ports in ports.items():
        port = server_ports.grpc if protocol == "grpc" else server_ports.http
        with FusionClient(f"localhost:{port}", protocol, timeout_s=120) as client:
            results[name] = client.fuse(hanks_png, group_jpg, 100, 100, OPTIONS)
    device, host = results["device"], results["host"]
    assert len(device.metadata["target"]["faces"]) == len(host.metadata["target"]["faces"]) == 6
    fused_device, fused_host = decode_image(device.image), decode_image(host.image)
    assert fused_device.shape == fused_host.shape
    # The two paths sample crops differently (tensor gathers vs OpenCV), so the results are close, not identical.
    assert _psnr(fused_device, fused_host) > 30.0
    assert extract_watermark(fused_device).watermark_id == OPTIONS["watermark_id"]


def test_device_path_fails_bad_input_with_the_codes(device_path_server, faceless_png, group_jpg):
    with FusionClient(f"localhost:{device_path_server.ports.grpc}", "grpc", timeout_s=120) as client:
        for source, target, code in ((b"\x00garbage\xff" * 10, group_jpg, errors.INVALID_IMAGE),
                                     (faceless_png, group_jpg, errors.NO_FACE_IN_SOURCE),
                                     (group_jpg, faceless_png, errors.NO_FACE_IN_TARGET)):
            with pytest.raises(FusionServerError) as caught:
                client.fuse(source, target, 100, 100, OPTIONS)
            assert caught.value.code == code, caught.value.raw
        assert client.fuse(group_jpg, group_jpg, 50, 50, OPTIONS).image  # and it keeps serving


def test_hostile_catalogue_gets_its_codes_on_the_device_path(device_path_server):
    """bench/hostile.py's encoded cases (over gRPC) through the tensor decode (EXIF orientation, limits, odd
    formats), BlazeFace and the tensor crops: each gets its code or a correct result, and the server stays ready with
    no stub traceback."""
    from bench.hostile import OK, build_catalogue, check_result, preprocess_limits

    offset = device_path_server.log.stat().st_size
    failures = []
    with FusionClient(f"localhost:{device_path_server.ports.grpc}", "grpc", timeout_s=300) as client:
        for case in build_catalogue(preprocess_limits()):
            try:
                result = client.fuse(case.source, case.target, case.face_degree, case.profile_degree, case.options)
            except FusionServerError as error:
                if error.code != case.expect:
                    failures.append(f"{case.name}: expected {case.expect}, got {error.raw[:200]}")
                continue
            if case.expect != OK:
                failures.append(f"{case.name}: expected {case.expect}, got a result")
            failures += [f"{case.name}: {problem}" for problem in check_result(case, result.image, result.metadata)]
    assert not failures, "\n".join(failures)
    assert device_path_server.running
    with open(device_path_server.log, "rb") as log:
        log.seek(offset)
        new = log.read().decode(errors="replace")
    assert not [line for line in new.splitlines() if "Traceback" in line or "Stub process" in line]

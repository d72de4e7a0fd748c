"""Integration tests against the real local Triton server over gRPC and HTTP, with tritonclient."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from client.api import FusionClient, FusionServerError
from facefuse import errors
from facefuse.imaging import decode_image
from facefuse.watermark import extract_watermark
from tests.conftest import REPO_ROOT, encode

pytestmark = pytest.mark.live
PROTOCOLS = ("grpc", "http")


def make_client(server, protocol: str) -> FusionClient:
    port = server["ports"].grpc if protocol == "grpc" else server["ports"].http
    return FusionClient(f"localhost:{port}", protocol, timeout_s=120)


@pytest.fixture(params=PROTOCOLS)
def client(request, triton_server):
    with make_client(triton_server, request.param) as fusion_client:
        yield fusion_client


def assert_error(caught, code: str) -> None:
    error = caught.value
    assert error.code == code, error.raw
    # Triton's ensemble scheduler prefixes "in ensemble 'face_fusion', "; the code starts our own message.
    assert re.match(rf"^(in ensemble 'face_fusion', )?{code}: \S", error.raw), error.raw


def _box_region(box, shape, grow: float = 0.0):
    x1, y1, x2, y2 = box
    dx, dy = (x2 - x1) * grow, (y2 - y1) * grow
    return (slice(max(0, int(y1 - dy)), min(shape[0], int(y2 + dy))),
            slice(max(0, int(x1 - dx)), min(shape[1], int(x2 + dx))))


def test_real_fusion_changes_the_face_and_nothing_far_from_it(client, hanks_png, group_jpg):
    result = client.fuse(hanks_png, group_jpg, 100, 100, {"target_face": 0, "format": "png"})
    target, fused = decode_image(group_jpg).astype(float), decode_image(result.image).astype(float)
    assert fused.shape == target.shape
    box = result.metadata["target"]["faces"][0]["box"]
    inner = _box_region(box, target.shape, grow=-0.2)
    face_change = np.abs(fused[inner] - target[inner]).mean()
    far = np.ones(target.shape[:2], bool)
    far[_box_region(box, target.shape, grow=1.0)] = False
    # Low-pass both first: the invisible watermark is a faint high-frequency pattern over the whole image.
    blurred_fused, blurred_target = (cv2.GaussianBlur(image, (0, 0), 4) for image in (fused, target))
    background_change = np.abs(blurred_fused[far] - blurred_target[far]).mean()
    print(f"{client.protocol}: mean abs change inside the face {face_change:.1f}, far background "
          f"{background_change:.2f} (0-255)")
    assert face_change > 8.0
    assert background_change < 1.0  # only the invisible watermark touches it


def test_degree_zero_leaves_the_target_unchanged(client, hanks_png, group_jpg):
    result = client.fuse(hanks_png, group_jpg, 0, 0, {"format": "png"})
    fused, target = (cv2.GaussianBlur(decode_image(data).astype(float), (0, 0), 4)
                     for data in (result.image, group_jpg))
    change = np.abs(fused - target)
    assert change.mean() < 1.0 and change.max() < 8


def test_metadata_is_complete(client, hanks_png, group_jpg):
    result = client.fuse(hanks_png, group_jpg, 60, 40, {"target_face": 2, "watermark_id": "00c0ffee"})
    meta = result.metadata
    assert len(meta["target"]["faces"]) == 6 and len(meta["source"]["faces"]) == 1
    areas = [(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in meta["target"]["faces"]]
    assert areas == sorted(areas, reverse=True)
    for face in meta["target"]["faces"]:
        assert len(face["box"]) == 4 and len(face["landmarks"]) == 5 and 0 < face["score"] <= 1
    assert meta["target"]["chosen_face"] == 2 and meta["source"]["chosen_face"] == 0
    assert meta["face_degree"] == 60 and meta["profile_degree"] == 40
    assert meta["watermark_id"] == "0000000000c0ffee"
    assert {"decode", "detect", "align", "paste", "watermark", "encode"} <= set(meta["timings_ms"])
    assert meta["versions"]["interface"] == "v1" and meta["versions"]["fusion_network"]
    assert meta["output"]["width"] == meta["target"]["width"]


@pytest.mark.parametrize("fmt,magic", [("jpeg", b"\xff\xd8"), ("png", b"\x89PNG"), ("webp", b"RIFF")])
def test_output_formats_carry_the_watermark(triton_server, hanks_png, group_jpg, fmt, magic):
    with make_client(triton_server, "grpc") as fusion_client:
        result = fusion_client.fuse(hanks_png, group_jpg, 100, 100, {"format": fmt, "watermark_id": "abc123"})
    assert result.image.startswith(magic)
    reading = extract_watermark(decode_image(result.image))
    assert reading.present and reading.watermark_id == "0000000000abc123"


def test_verify_cli_finds_the_id(triton_server, hanks_png, group_jpg, tmp_path):
    with make_client(triton_server, "http") as fusion_client:
        result = fusion_client.fuse(hanks_png, group_jpg, 100, 100, {"watermark_id": "feedc0de12345678"})
    path = tmp_path / "fused.jpg"
    path.write_bytes(result.image)
    verified = subprocess.run([sys.executable, "-m", "client", "verify", str(path)], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True)
    report = json.loads(verified.stdout)
    assert report["watermark_present"] is True and report["watermark_id"] == "feedc0de12345678"
    assert report["provenance"]["digital_source_type"].endswith("compositeWithTrainedAlgorithmicMedia")


def test_verify_cli_reports_an_unmarked_photo(tmp_path, group_jpg):
    path = tmp_path / "plain.jpg"
    path.write_bytes(group_jpg)
    verified = subprocess.run([sys.executable, "-m", "client", "verify", str(path)], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True)
    report = json.loads(verified.stdout)
    assert report["watermark_present"] is False and report["provenance"] is None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fuse_cli_writes_the_image_and_prints_codes(triton_server, protocol, tmp_path):
    from facefuse.samples import sample_image_path

    port = triton_server["ports"].grpc if protocol == "grpc" else triton_server["ports"].http
    common = [sys.executable, "-m", "client", "fuse", "--protocol", protocol, "--url", f"localhost:{port}"]
    out = tmp_path / "out.png"
    ok = subprocess.run([*common, "--source", str(sample_image_path("Tom_Hanks_54745.png")), "--target",
                         str(sample_image_path("t1.jpg")), "--out", str(out), "--face-degree", "70"],
                        cwd=REPO_ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert out.read_bytes().startswith(b"\x89PNG")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    bad = subprocess.run([*common, "--source", str(garbage), "--target", str(sample_image_path("t1.jpg")),
                          "--out", str(tmp_path / "x.jpg")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "INVALID_IMAGE: " in bad.stderr


def test_garbage_bytes_are_invalid_image(client, group_jpg):
    with pytest.raises(FusionServerError) as caught:
        client.fuse(b"\x00garbage\xff" * 10, group_jpg)
    assert_error(caught, errors.INVALID_IMAGE)
    with pytest.raises(FusionServerError) as caught:
        client.fuse(group_jpg, group_jpg[: len(group_jpg) // 2])
    assert_error(caught, errors.INVALID_IMAGE)


def test_image_without_a_face(client, faceless_png, group_jpg):
    with pytest.raises(FusionServerError) as caught:
        client.fuse(faceless_png, group_jpg)
    assert_error(caught, errors.NO_FACE_IN_SOURCE)
    with pytest.raises(FusionServerError) as caught:
        client.fuse(group_jpg, faceless_png)
    assert_error(caught, errors.NO_FACE_IN_TARGET)


def test_too_small_image(client, group_jpg):
    with pytest.raises(FusionServerError) as caught:
        client.fuse(encode(np.full((16, 16, 3), 128, np.uint8)), group_jpg)
    assert_error(caught, errors.IMAGE_TOO_SMALL)


@pytest.mark.parametrize("face_degree,profile_degree", [(100.5, 50), (-1, 50), (50, 1000), (float("nan"), 50),
                                                        (50, float("inf"))])
def test_degree_out_of_range(client, hanks_png, group_jpg, face_degree, profile_degree):
    with pytest.raises(FusionServerError) as caught:
        client.fuse(hanks_png, group_jpg, face_degree, profile_degree)
    assert_error(caught, errors.INVALID_DEGREE)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"format": "gif"}', b'{"unknown_key": 1}', b"\xff\xfe"])
def test_malformed_options(client, hanks_png, group_jpg, raw):
    with pytest.raises(FusionServerError) as caught:
        client.fuse(hanks_png, group_jpg, options=raw)
    assert_error(caught, errors.INVALID_OPTIONS)


def test_face_index_out_of_range(client, hanks_png, group_jpg):
    with pytest.raises(FusionServerError) as caught:
        client.fuse(hanks_png, group_jpg, options={"target_face": 6})
    assert_error(caught, errors.FACE_INDEX_OUT_OF_RANGE)
    assert "6 face(s)" in caught.value.message


def test_composing_model_errors_start_with_the_code(triton_server):
    """Called directly, preprocess's message starts with the code; the ensemble only adds Triton's prefix."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"localhost:{triton_server['ports'].grpc}")
    inputs = []
    for name, value in (("SOURCE_IMAGE", b"junk"), ("TARGET_IMAGE", b"junk"), ("OPTIONS", b"{}")):
        tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[value]], dtype=object))
        inputs.append(tensor)
    for name in ("FACE_DEGREE", "PROFILE_DEGREE"):
        tensor = grpcclient.InferInput(name, [1, 1], "FP32")
        tensor.set_data_from_numpy(np.array([[50.0]], dtype=np.float32))
        inputs.append(tensor)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("preprocess", inputs)
    assert caught.value.message().startswith("INVALID_IMAGE: ")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_bad_request_among_concurrent_ones_fails_alone(triton_server, protocol, hanks_png, group_jpg,
                                                           faceless_png):
    jobs = [(hanks_png, group_jpg, {"target_face": i % 6}) for i in range(7)]
    jobs.insert(3, (faceless_png, group_jpg, {}))

    def run(job):
        source, target, options = job
        with make_client(triton_server, protocol) as fusion_client:
            try:
                return fusion_client.fuse(source, target, 80, 80, options)
            except FusionServerError as error:
                return error

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    failures = [i for i, r in enumerate(results) if isinstance(r, FusionServerError)]
    assert failures == [3] and results[3].code == errors.NO_FACE_IN_SOURCE
    for i, result in enumerate(results):
        if i != 3:
            assert result.metadata["target"]["chosen_face"] == jobs[i][2]["target_face"]
            assert len(result.image) > 10_000


def test_one_request_of_two_rows_with_targets_of_different_sizes(triton_server, hanks_png, group_jpg):
    """Rows of one request travel together: preprocess pads their targets to one TARGET_RGB tensor, postprocess
    cuts each back to its own size."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"localhost:{triton_server['ports'].grpc}")
    rows = [(hanks_png, group_jpg), (group_jpg, hanks_png)]
    inputs = []
    for position, name in enumerate(("SOURCE_IMAGE", "TARGET_IMAGE")):
        tensor = grpcclient.InferInput(name, [2, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[row[position]] for row in rows], dtype=object))
        inputs.append(tensor)
    options = grpcclient.InferInput("OPTIONS", [2, 1], "BYTES")
    options.set_data_from_numpy(np.array([[b"{}"], [b"{}"]], dtype=object))
    inputs.append(options)
    for name in ("FACE_DEGREE", "PROFILE_DEGREE"):
        tensor = grpcclient.InferInput(name, [2, 1], "FP32")
        tensor.set_data_from_numpy(np.full((2, 1), 100.0, dtype=np.float32))
        inputs.append(tensor)
    result = client.infer("face_fusion", inputs)
    images = result.as_numpy("FUSED_IMAGE").reshape(-1)
    targets = [decode_image(target) for _, target in rows]
    for image, target in zip(images, targets):
        fused = decode_image(bytes(image))
        assert fused.shape == target.shape
        assert extract_watermark(fused).watermark_id is not None
        # Outside the face the target comes back (up to JPEG): no padding or another row's pixels leak in.
        assert abs(float(fused[:8, :8].mean()) - float(target[:8, :8].mean())) < 12


def test_postprocess_names_the_cuda_pool_when_the_target_arrives_empty(triton_server):
    """Triton 2.51 passes an empty tensor on when it cannot place a GPU tensor in its CUDA memory pool: postprocess
    fails that request with a coded error naming the pool and the switch, not with an obscure shape error."""
    import json

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"localhost:{triton_server['ports'].grpc}")
    metadata = json.dumps({"target": {"width": 64, "height": 48}, "timings_ms": {}}).encode()
    values = {"FUSED_CROP": np.zeros((1, 3, 256, 256), np.float32),
              "BLEND_MASK": np.zeros((1, 1, 256, 256), np.float32),
              "TARGET_RGB": np.zeros((1, 0, 0, 3), np.uint8), "TARGET_MATRIX": np.eye(2, 3, dtype=np.float32)[None],
              "PRE_METADATA": np.array([[metadata]], dtype=object), "OPTIONS": np.array([[b"{}"]], dtype=object)}
    inputs = []
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, list(value.shape), "BYTES" if value.dtype == object else
                                       {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}[value.dtype])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("postprocess", inputs)
    assert "INTERNAL_ERROR: TARGET_RGB arrived empty" in caught.value.message()
    assert "--cuda-memory-pool-byte-size" in caught.value.message()


def test_zz_server_is_still_ready_and_no_stub_died(triton_server):
    for protocol in PROTOCOLS:
        with make_client(triton_server, protocol) as fusion_client:
            assert fusion_client.is_ready()
    assert triton_server["process"].poll() is None
    log = triton_server["log"].read_text(errors="replace")
    assert "Stub process" not in log or "is not healthy" not in log
    assert "Segmentation fault" not in log

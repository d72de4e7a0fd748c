"""The GPU path of preprocess (images as device tensors: pyramid, crops and alignment warp on the device), run here
on the CPU device against the host (OpenCV) path it replaces on GPU hosts."""

from __future__ import annotations

import importlib.util
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from bench.inputs import benchmark_pair
from facefuse import detection, errors
from facefuse.alignment import alignment_matrix, crop_to_tensor, invert_affine, transform_points, warp_to_crop
from facefuse.detection import FaceDetector
from facefuse.device_imaging import (
    JPEG_DECODER_VARIABLE,
    crops_to_network,
    decode_on_device,
    describe_jpeg_decoding,
    gpu_jpeg_decoder,
    host_array,
    image_to_device,
    nvjpeg_decoder,
    orient,
    to_device,
    to_host,
    warp_crops_of_images,
    warp_to_crops,
)
from facefuse.errors import FusionError
from facefuse.face_mesh import FaceMesh
from facefuse.imaging import _ORIENTATION_TRANSPOSE, ImageLimits, decode_image, encode_image
from facefuse.pipeline import FusionRequest, PreparedFusion, Preprocessor
from facefuse.samples import sample_image_path


@pytest.fixture(scope="module")
def group() -> np.ndarray:
    return decode_image(sample_image_path("t1.jpg").read_bytes())


@pytest.fixture(scope="module")
def host_detector() -> FaceDetector:
    return FaceDetector(max_side=640)


@pytest.fixture(scope="module")
def device_detector() -> FaceDetector:
    return FaceDetector(max_side=640, images_on_device=True)


def test_cuda_detector_defaults_to_the_device_path_and_cpu_to_the_host_path(host_detector):
    assert host_detector.images_on_device is False
    assert FaceDetector.__init__.__defaults__ is not None  # the flag exists with an automatic default (None)
    if torch.cuda.is_available():
        assert FaceDetector(device="cuda").images_on_device is True


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillow_exif_transposes(orientation):
    rng = np.random.default_rng(orientation)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).transpose(_ORIENTATION_TRANSPOSE[orientation])) \
        if orientation != 1 else image
    np.testing.assert_array_equal(orient(torch.from_numpy(image), orientation).numpy(), expected)


def test_warp_to_crops_matches_opencv_including_mirrored_borders(group, host_detector):
    faces = FaceDetector().detect(group)
    matrices = np.stack([alignment_matrix(face.landmarks) for face in faces])
    crops = warp_to_crops(torch.from_numpy(group), matrices).numpy()
    differences = [np.abs(warp_to_crop(group, matrix).astype(int) - crop.astype(int))
                   for matrix, crop in zip(matrices, crops)]
    # One face of the group photo runs off the top edge, so the mirrored border (REFLECT101) is exercised.
    corners = np.array([[0.0, 0.0], [255.0, 0.0], [0.0, 255.0], [255.0, 255.0]])
    assert any(transform_points(invert_affine(matrix), corners).min() < 0 for matrix in matrices)
    assert max(int(d.max()) for d in differences) <= 2  # OpenCV's fixed-point weights vs float
    assert max(float(d.mean()) for d in differences) < 0.1


def test_crops_of_several_images_at_once_match_opencv(group):
    # Images of different sizes in one gather; crop n comes from image image_index[n].
    hanks = decode_image(sample_image_path("Tom_Hanks_54745.png").read_bytes())
    images = [group, hanks, np.ascontiguousarray(group[::2, ::3])]
    detector = FaceDetector()
    plan = [(index, alignment_matrix(face.landmarks)) for index, image in enumerate(images)
            for face in detector.detect(image)[:3]]
    image_index = np.array([index for index, _ in plan])
    matrices = np.stack([matrix for _, matrix in plan])
    assert set(image_index.tolist()) == {0, 1, 2}
    crops = warp_crops_of_images([torch.from_numpy(image) for image in images], image_index, matrices).numpy()
    for (index, matrix), crop in zip(plan, crops):
        difference = np.abs(warp_to_crop(images[index], matrix).astype(int) - crop.astype(int))
        # OpenCV places samples on a 1/32 px grid: the more a crop enlarges (up to 3x here), the more that shows.
        assert int(difference.max()) <= 4 and float(difference.mean()) < 0.15


def test_crops_read_planar_photos_in_place_like_packed_ones(group):
    """nvJPEG's photos are (3,H,W) planes under HxWx3 views: the gather reads them where they are (no packed copy)
    and gets the very bytes it gets from packed HxWx3 copies; a strided view (neither layout) is packed first."""
    hanks = decode_image(sample_image_path("Tom_Hanks_54745.png").read_bytes())
    packed = [group, hanks, np.ascontiguousarray(group[::2])]
    views = [torch.from_numpy(np.ascontiguousarray(group.transpose(2, 0, 1))).permute(1, 2, 0),
             torch.from_numpy(hanks), torch.from_numpy(group)[::2]]
    assert views[0].permute(2, 0, 1).is_contiguous() and not views[2].is_contiguous()
    rng = np.random.default_rng(3)
    image_index = np.array([0, 1, 2, 0, 2, 1])
    matrices = np.stack([_similarity_for(image.shape, rng) for image in (packed[i] for i in image_index)])
    expected = warp_crops_of_images([torch.from_numpy(image) for image in packed], image_index, matrices)
    assert torch.equal(warp_crops_of_images(views, image_index, matrices), expected)
    assert torch.equal(warp_crops_of_images(views[:1], np.zeros(2, dtype=np.int64), matrices[[0, 3]]),
                       expected[[0, 3]])


def _similarity_for(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A random image -> crop similarity around a point of an image of ``shape`` (some run off its edges)."""
    height, width = shape[:2]
    angle, scale = rng.uniform(-0.6, 0.6), 256.0 / rng.uniform(60, 400)
    centre = np.array([rng.uniform(0, width), rng.uniform(0, height)])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.concatenate([rotation, (128.0 - rotation @ centre)[:, None]], axis=1)


def test_tables_uploaded_together_keep_dtype_shape_and_values():
    """to_device: mixed dtypes and shapes (empty, 0-d, non-contiguous, 1-byte types at odd lengths before 8-byte
    ones) through one buffer; every tensor equals its array. CPU here; on a GPU the same views of one upload."""
    rng = np.random.default_rng(3)
    arrays = [np.arange(3, dtype=np.uint8), rng.normal(size=(2, 2, 3)), np.zeros((0, 4), np.float32),
              np.array([True, False, True]), np.float64(2.5), rng.integers(-9, 9, (5, 6), dtype=np.int64)[:, ::2],
              rng.normal(size=(7,)).astype(np.float32)]
    tensors = to_device(arrays, "cpu")
    expected_dtypes = [torch.uint8, torch.float64, torch.float32, torch.bool, torch.float64, torch.int64,
                       torch.float32]
    assert [t.dtype for t in tensors] == expected_dtypes
    assert [tuple(t.shape) for t in tensors] == [np.shape(a) for a in arrays]
    assert all(np.array_equal(t.numpy(), a) for t, a in zip(tensors, arrays))
    assert to_device([], "cpu") == []


def test_host_and_device_copies_keep_every_pixel():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((5, 7, 3), (40, 3, 3), (1, 1, 3))]
    images.insert(1, rng.normal(size=(4, 4)).astype(np.float32))  # other dtypes ride along in their own buffer
    images.append(rng.integers(-5, 5, (3, 2), dtype=np.int32))
    arrays = to_host([torch.from_numpy(image) for image in images])
    assert [(a.shape, a.dtype) for a in arrays] == [(i.shape, i.dtype) for i in images]
    assert all(np.array_equal(a, i) for a, i in zip(arrays, images))
    assert to_host([]) == []
    read_only = images[0].copy()
    read_only.flags.writeable = False
    uploaded = image_to_device(read_only, torch.device("cpu"))
    assert np.array_equal(uploaded.numpy(), images[0]) and uploaded.numpy().flags.writeable


def _match(host_faces, device_faces, min_score=0.95):
    """Pairs of confident faces by box centre; asserts a one-to-one match."""
    host = [f for f in host_faces if f.score >= min_score]
    device = [f for f in device_faces if f.score >= min_score]
    assert len(host) == len(device) > 0
    pairs = []
    for face in host:
        centre = (face.box[:2] + face.box[2:]) / 2
        distances = [np.linalg.norm((other.box[:2] + other.box[2:]) / 2 - centre) for other in device]
        pairs.append((face, device[int(np.argmin(distances))]))
    assert len({id(other) for _, other in pairs}) == len(pairs)
    return pairs


def _iou(a, b):
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


def test_device_detector_finds_the_same_faces_as_the_host_path(group, host_detector, device_detector):
    source, target = benchmark_pair()
    images = [group, decode_image(source), decode_image(target),
              decode_image(sample_image_path("Tom_Hanks_54745.png").read_bytes())]
    host = host_detector.detect_batch(images)
    device = device_detector.detect_batch([torch.from_numpy(image) for image in images])
    worst_iou, worst_landmarks = 1.0, 0.0
    for host_faces, device_faces in zip(host, device):
        for a, b in _match(host_faces, device_faces):
            eye_distance = float(np.linalg.norm(a.landmarks[1] - a.landmarks[0]))
            worst_iou = min(worst_iou, float(_iou(a.box, b.box)))
            worst_landmarks = max(worst_landmarks, float(np.abs(a.landmarks - b.landmarks).max()) / eye_distance)
    # MTCNN keeps whichever proposal wins the NMS, so a slightly different pyramid (float resampling vs OpenCV's
    # INTER_AREA) moves boxes and points a little; measured here: IoU >= 0.93, points within 6.4 % of the eye distance.
    assert worst_iou > 0.8
    assert worst_landmarks < 0.2


def test_batched_device_detection_equals_one_call_per_image(group, device_detector):
    # Same-size images share one pyramid and one P-Net pass per level; a different size makes its own group.
    source, target = benchmark_pair()
    hanks = decode_image(sample_image_path("Tom_Hanks_54745.png").read_bytes())
    images = [decode_image(source), hanks, decode_image(target), group, np.zeros((200, 300, 3), np.uint8)]
    batched = device_detector.detect_batch(images)
    assert [len(faces) > 0 for faces in batched] == [True, True, True, True, False]
    for image, batch_faces in zip(images, batched):
        single = device_detector.detect(image)
        assert len(single) == len(batch_faces)
        for a, b in zip(single, batch_faces):
            np.testing.assert_allclose(a.box, b.box, atol=0.05)
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=0.05)


def test_device_crops_sample_like_grid_sample(group):
    # The gather in _TensorPyramid.crops replaces one grid_sample per level; boxes reach past every border.
    pyramid = FaceDetector(max_side=640, images_on_device=True)._prepare_groups([group, group[:, ::-1]])[0][0]
    boxes = np.array([[-30.5, -20.0, 60.0, 69.5], [100.2, 80.7, 140.9, 121.4], [500.0, 300.0, 900.0, 700.0],
                      [10.0, 10.0, 400.0, 400.0]])
    batch_index = np.array([0, 1, 1, 0])
    got = pyramid.crops(boxes, batch_index, 24)
    level, matrices = detection._crop_plan(boxes, pyramid.scales, 24)
    centres = torch.arange(24, dtype=torch.float64)
    for n in range(len(boxes)):
        image = pyramid.levels[level[n]][batch_index[n]:batch_index[n] + 1]
        lh, lw = image.shape[2:]
        m = torch.as_tensor(matrices[n])
        gx = ((centres - m[0, 2]) / m[0, 0] + 0.5) * (2.0 / lw) - 1.0
        gy = ((centres - m[1, 2]) / m[1, 1] + 0.5) * (2.0 / lh) - 1.0
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1).float()[None]
        expected = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="zeros",
                                                   align_corners=False)[0]
        torch.testing.assert_close(got[n], expected, atol=0.05, rtol=0)
    assert float(got[0, :, 0, 0].abs().max()) == 0.0  # the corner lies outside the image: black


def test_device_detector_accepts_arrays_and_rejects_bad_input(device_detector, group):
    assert len(device_detector.detect(group)) == len(device_detector.detect(torch.from_numpy(group)))
    with pytest.raises(ValueError, match="uint8"):
        device_detector.detect(torch.zeros((10, 10, 3), dtype=torch.float32))
    assert device_detector.detect(torch.full((64, 64, 3), 128, dtype=torch.uint8)) == []


def _gpu_decoder_or_skip(choice: str):
    """The GPU decoder ``choice`` names, or a skip that says why this host has none."""
    if not torch.cuda.is_available():
        pytest.skip("the GPU decoders need a CUDA device (GPU hosts only)")
    try:
        decoder = gpu_jpeg_decoder("cuda", choice)
    except RuntimeError as error:
        pytest.skip(f"nvImageCodec is not usable on this GPU host: {error}")
    if decoder is None:
        pytest.skip(f"no {choice} decoder on this GPU host (torchvision is not installed)")
    return decoder


@pytest.mark.parametrize("device, choice", [("cpu", "auto"), ("cuda", "torchvision"), ("cuda", "nvimgcodec")])
def test_decode_on_device_gives_decode_image_results_and_errors(device, choice, monkeypatch):
    if device == "cuda":
        _gpu_decoder_or_skip(choice)
    monkeypatch.setenv(JPEG_DECODER_VARIABLE, choice)
    jpeg = sample_image_path("t1.jpg").read_bytes()
    png = encode_image(decode_image(jpeg), "png")
    # Bad files between good ones: each is its own error, the same as the host's, and the good ones still decode.
    items = [(jpeg, "source"), (png, "target"), (b"not an image", "source"), (jpeg[: len(jpeg) // 2], "target"),
             (jpeg, "target")]
    results = decode_on_device(items, ImageLimits(), torch.device(device))
    reference = decode_image(jpeg).astype(int)
    tolerance = 2.0 if device == "cuda" else 1e-9  # the GPU's IDCT differs from libjpeg's by a level here and there
    for result in (results[0], results[4]):
        assert result.device.type == device and result.shape == reference.shape
        assert np.abs(result.cpu().numpy().astype(int) - reference).mean() < tolerance
    np.testing.assert_array_equal(results[1].cpu().numpy(), decode_image(png))
    for result, (data, role) in zip(results[2:4], items[2:4]):
        assert isinstance(result, FusionError)
        with pytest.raises(FusionError) as expected:
            decode_image(data, role=role)
        assert str(result) == str(expected.value)
    assert "truncated" in str(results[3])
    small = decode_on_device([(jpeg, "target")], ImageLimits(max_side=100), torch.device(device))[0]
    assert isinstance(small, FusionError) and small.code == errors.IMAGE_TOO_LARGE


def test_truncated_jpeg_is_left_to_the_host_path():
    from facefuse.device_imaging import _jpeg_header

    jpeg = sample_image_path("t1.jpg").read_bytes()
    assert _jpeg_header(jpeg, "target", ImageLimits()) == 1  # a whole upright JPEG: for the GPU
    assert _jpeg_header(jpeg + b"trailing bytes", "target", ImageLimits()) == 1  # data after the end marker is fine
    for cut in (len(jpeg) // 2, len(jpeg) - 2, 400):  # cut in the scan data, just before the end marker
        assert _jpeg_header(jpeg[:cut], "target", ImageLimits()) is None


def test_jpeg_decoder_choice_is_checked(monkeypatch):
    assert gpu_jpeg_decoder("cpu") is None and gpu_jpeg_decoder(torch.device("cpu"), "torchvision") is None
    assert describe_jpeg_decoding("cpu") == "Pillow on the host"
    monkeypatch.setenv(JPEG_DECODER_VARIABLE, "nvjpg")
    with pytest.raises(ValueError, match="FACEFUSE_JPEG_DECODER='nvjpg': expected one of auto, nvimgcodec"):
        gpu_jpeg_decoder("cpu")
    jpeg = sample_image_path("t1.jpg").read_bytes()
    with pytest.raises(ValueError, match="FACEFUSE_JPEG_DECODER"):  # a bad setting is loud, not a silent host path
        decode_on_device([(jpeg, "source")], ImageLimits(), torch.device("cpu"))
    monkeypatch.setenv(JPEG_DECODER_VARIABLE, " TorchVision ")
    assert gpu_jpeg_decoder("cpu") is None


@pytest.mark.skipif(nvjpeg_decoder() is not None or importlib.util.find_spec("nvidia") is not None,
                    reason="checks the choice where neither torchvision nor nvImageCodec is installed (the CPU venv)")
def test_jpeg_decoder_choice_without_the_gpu_decoders_installed():
    from facefuse.device_imaging import _gpu_jpeg_decoder

    _gpu_jpeg_decoder.cache_clear()
    try:
        assert _gpu_jpeg_decoder(0, "auto") is None and _gpu_jpeg_decoder(0, "torchvision") is None  # the host path
        with pytest.raises(RuntimeError, match="FACEFUSE_JPEG_DECODER=nvimgcodec but nvImageCodec is not usable "
                                               "here \\(ModuleNotFoundError.*install nvidia-nvimgcodec-cu12"):
            _gpu_jpeg_decoder(0, "nvimgcodec")  # asked for by name: loud, not a silent fallback
    finally:
        _gpu_jpeg_decoder.cache_clear()


@pytest.mark.parametrize("choice", ["nvimgcodec", "torchvision"])
def test_gpu_jpeg_decoders_match_pillow(choice):
    decoder = _gpu_decoder_or_skip(choice)
    assert decoder is gpu_jpeg_decoder(torch.device("cuda", torch.cuda.current_device()), choice)  # one per GPU
    jpeg = sample_image_path("t1.jpg").read_bytes()
    bad = [b"not a jpeg"] if choice == "nvimgcodec" else []  # truncated files: decode_on_device's test
    decoded = decoder([jpeg, *bad, jpeg], torch.device("cuda"))
    reference = torch.from_numpy(decode_image(jpeg).astype(int)).permute(2, 0, 1)
    first = decoded[0]
    difference = ((first.cpu().to(torch.int64) - reference).abs().float().mean().item()
                  if first is not None and first.shape == reference.shape else None)
    # Everything in one message: on a GPU host a failure should say which property broke and how.
    layout = ("None" if first is None
              else f"shape {tuple(first.shape)} stride {first.stride()} {first.dtype} on {first.device}")
    facts = (f"{choice}: {layout}, mean difference from Pillow {difference}, "
             f"bad files gave {[None if image is None else tuple(image.shape) for image in decoded[1:-1]]}")
    assert first is not None and first.shape == reference.shape and first.dtype == torch.uint8, facts
    assert first.is_cuda and first.is_contiguous(), facts  # planar RGB: the layout the later steps were tuned on
    assert difference < 2.0, facts  # IDCTs differ slightly
    assert torch.equal(first, decoded[-1]), facts
    assert all(image is None for image in decoded[1:-1]), facts  # a bad file is that file's None, not the batch's


@pytest.mark.skipif(not torch.cuda.is_available() or nvjpeg_decoder() is None,
                    reason="nvJPEG decoding needs a CUDA device and torchvision (GPU hosts only)")
def test_nvjpeg_decode_matches_pillow():
    jpeg = sample_image_path("t1.jpg").read_bytes()
    decoded = decode_on_device([(jpeg, "source")] * 3, ImageLimits(), torch.device("cuda"))
    reference = decode_image(jpeg).astype(int)
    for image in decoded:
        assert image.is_cuda
        assert np.abs(image.cpu().numpy().astype(int) - reference).mean() < 2.0  # IDCT implementations differ


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_preprocessor_device_path_matches_host_path(host_detector, device_detector):
    source, target = benchmark_pair()
    # A face other than the largest, by its index: one both paths rank alike. The group photo's faces are of
    # nearly one size, and two within ~1 % of area may swap places between the paths (each box agrees to a pixel
    # or two); which pair does is not what this test is about.
    host_faces, device_faces = (detector.detect(decode_image(target)) for detector in (host_detector, device_detector))
    other = next(index for index in range(1, len(host_faces))
                 if _iou(host_faces[index].box, device_faces[index].box) > 0.7)
    rows = [FusionRequest(source, target, 100.0, 50.0, b"{}"),
            FusionRequest(source, target, 100.0, 50.0, json.dumps({"target_face": other}).encode()),
            FusionRequest(source, b"garbage", 100.0, 50.0, b"{}"),
            FusionRequest(source, target, 170.0, 50.0, b"{}")]
    mesh = FaceMesh()
    host = Preprocessor(host_detector, mesh).prepare_batch(rows)
    device = Preprocessor(device_detector, mesh).prepare_batch(rows)
    for a, b in zip(host, device):
        assert type(a) is type(b)
        if isinstance(a, FusionError):
            assert a.code == b.code and str(a) == str(b)
            continue
        assert isinstance(b, PreparedFusion)
        assert b.target_rgb.shape == a.target_rgb.shape and isinstance(b.target_rgb, np.ndarray)
        np.testing.assert_array_equal(a.target_rgb, b.target_rgb)
        for name, value in a.network_inputs.items():
            assert b.network_inputs[name].shape == value.shape and b.network_inputs[name].dtype == value.dtype
        json.dumps(b.metadata)  # plain Python numbers, not tensors
        # The same face was chosen: the two alignments put the face in nearly the same place.
        corners = np.array([[0.0, 0.0, 1.0], [255.0, 255.0, 1.0]])
        assert np.abs(corners @ np.linalg.pinv(np.vstack([a.target_matrix, [0, 0, 1]]))[:2].T -
                      corners @ np.linalg.pinv(np.vstack([b.target_matrix, [0, 0, 1]]))[:2].T).max() < 25
    assert [getattr(result, "code", None) for result in device[2:]] == [errors.INVALID_IMAGE, errors.INVALID_DEGREE]
    assert device[0].target_rgb is device[1].target_rgb  # rows sharing a target (a template) copy it down once


def test_preprocessor_keeps_targets_on_the_device_when_asked(device_detector):
    """outputs_on_device (preprocess's TARGET_RGB and network crops in GPU memory, handed over through DLPack): the
    targets and the network's crops stay tensors on the detector's device, the same values as the host copies; the
    uint8 crops (the face mesh's input) stay there on either setting."""
    source, target = benchmark_pair()
    rows = [FusionRequest(source, target, 100.0, 50.0, b"{}"), FusionRequest(target, source, 80.0, 20.0, b"{}")]
    mesh = FaceMesh()
    host = Preprocessor(device_detector, mesh).prepare_batch(rows)
    kept = Preprocessor(device_detector, mesh, outputs_on_device=True).prepare_batch(rows)
    for a, b in zip(host, kept):
        assert isinstance(b.target_rgb, torch.Tensor) and b.target_rgb.device == device_detector.device
        np.testing.assert_array_equal(b.target_rgb.cpu().numpy(), a.target_rgb)
        for crop in (a.source_crop, a.target_crop, b.source_crop, b.target_crop):  # the mesh's input, not copied down
            assert isinstance(crop, torch.Tensor) and crop.device == device_detector.device
        np.testing.assert_array_equal(host_array(b.source_crop), host_array(a.source_crop))
        np.testing.assert_array_equal(host_array(b.target_crop), host_array(a.target_crop))
        expected = np.stack([crop_to_tensor(host_array(b.source_crop)), crop_to_tensor(host_array(b.target_crop))])
        assert isinstance(b.network_inputs["CROPS"], torch.Tensor)
        assert b.network_inputs["CROPS"].device == device_detector.device
        np.testing.assert_array_equal(b.network_inputs["CROPS"].cpu().numpy(), expected)
        np.testing.assert_array_equal(a.network_inputs["CROPS"], expected)
        np.testing.assert_allclose(a.network_inputs["GEOMETRY"], b.network_inputs["GEOMETRY"], rtol=0, atol=1e-3)
    host_only = Preprocessor(FaceDetector(max_side=640), mesh, outputs_on_device=True).prepare_batch(rows[:1])
    assert isinstance(host_only[0].target_rgb, np.ndarray)  # the host path has no device to keep them on


def test_network_layout_made_on_the_device_is_crop_to_tensor_exactly():
    crops = np.random.default_rng(3).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    on_device = crops_to_network(torch.from_numpy(crops)).numpy()
    assert on_device.dtype == np.float32 and on_device.flags.c_contiguous
    for crop, network in zip(crops, on_device):
        assert np.array_equal(network, crop_to_tensor(crop))


def test_rows_are_stacked_and_batches_concatenated_in_their_kind():
    from facefuse.device_imaging import concat_rows, stack_rows

    rows = [np.full((2, 3), value, np.float32) for value in (1, 2)]
    assert isinstance(stack_rows(rows), np.ndarray) and stack_rows(rows).shape == (2, 2, 3)
    stacked = stack_rows([torch.from_numpy(row) for row in rows])
    assert isinstance(stacked, torch.Tensor) and stacked.shape == (2, 2, 3)
    # One row (most responses): a view of it, no copy.
    row = torch.from_numpy(rows[0])
    assert stack_rows([row]).shape == (1, 2, 3) and stack_rows([row]).data_ptr() == row.data_ptr()
    assert np.shares_memory(stack_rows(rows[:1]), rows[0]) and stack_rows(rows[:1]).shape == (1, 2, 3)
    mixed = [rows[0][None], torch.from_numpy(rows[1])[None]]  # a host batch and a tensor batch
    on_host = concat_rows(mixed, None)
    assert isinstance(on_host, np.ndarray) and on_host[:, 0, 0].tolist() == [1, 2]
    on_device = concat_rows(mixed, torch.device("cpu"))
    assert isinstance(on_device, torch.Tensor) and on_device[:, 0, 0].tolist() == [1, 2]


def test_whole_factor_shrink_is_opencvs_area_resize(group):
    # 1080p to the service's 640 x 360 working size is a 3x shrink on both axes: block means from the uint8 pixels,
    # OpenCV's INTER_AREA (the host path's) before its rounding.
    assert detection.whole_factor(1080, 1920, (640, 360)) == 3
    assert detection.whole_factor(720, 1280, (640, 360)) == 2
    for h, w, size in ((1080, 1920, None), (1080, 1920, (1920, 1080)), (1000, 1920, (640, 333)),
                       (1080, 1920, (640, 540)), (1081, 1920, (640, 360))):
        assert detection.whole_factor(h, w, size) is None, (h, w, size)
    photo = cv2.resize(group, (1920, 1080), interpolation=cv2.INTER_LINEAR)
    pixels = torch.from_numpy(np.stack([photo, photo[::-1].copy()])).permute(0, 3, 1, 2).contiguous()
    shrunk = detection.shrink_by_whole_factor(pixels, 3)
    assert shrunk.shape == (2, 3, 360, 640) and shrunk.dtype == torch.float32
    for index, image in enumerate((photo, photo[::-1].copy())):
        expected = cv2.resize(image, (640, 360), interpolation=cv2.INTER_AREA).astype(np.float32)
        difference = np.abs(shrunk[index].permute(1, 2, 0).numpy() - expected)
        assert difference.max() <= 0.5 + 1e-4  # OpenCV rounds the same mean to uint8
    block = photo[3:6, 6:9].astype(np.float64).mean(axis=(0, 1))
    np.testing.assert_allclose(shrunk[0, :, 1, 2].numpy(), block, atol=1e-4)


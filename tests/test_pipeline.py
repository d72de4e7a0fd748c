"""The preprocess/postprocess logic in-process with the real detector: per-row errors, face choice, paste-back."""

import json

import cv2
import numpy as np
import pytest
import torch

from facefuse import errors
from facefuse.alignment import crop_to_tensor
from facefuse.detection import FaceDetector
from facefuse.engine import LocalFusion
from facefuse.errors import FusionError
from facefuse.face_mesh import FaceMesh
from facefuse.imaging import decode_image
from facefuse.network import INPUT_SHAPES, unpack_geometry
from facefuse.pipeline import FusionRequest, PreparedFusion, Preprocessor, UniqueImages, stack_images, unpad_image
from facefuse.watermark import extract_watermark
from tests.conftest import encode


@pytest.fixture(scope="module")
def preprocessor():
    return Preprocessor(FaceDetector(), FaceMesh())


def test_batch_rows_succeed_or_fail_on_their_own(preprocessor, hanks_png, group_jpg, faceless_png):
    rows = [
        FusionRequest(hanks_png, group_jpg, 100, 100, b"{}"),
        FusionRequest(b"junk", group_jpg, 100, 100, b"{}"),
        FusionRequest(hanks_png, group_jpg, 70, 30, b'{"target_face": 3}'),
        FusionRequest(faceless_png, group_jpg, 100, 100, b"{}"),
        FusionRequest(hanks_png, group_jpg, 101, 100, b"{}"),
        FusionRequest(hanks_png, group_jpg, 50, 50, b'{"target_face": 9}'),
    ]
    results = preprocessor.prepare_batch(rows)
    assert [r.code if isinstance(r, FusionError) else "ok" for r in results] == [
        "ok", errors.INVALID_IMAGE, "ok", errors.NO_FACE_IN_SOURCE, errors.INVALID_DEGREE,
        errors.FACE_INDEX_OUT_OF_RANGE]
    first, third = results[0], results[2]
    assert isinstance(first, PreparedFusion) and isinstance(third, PreparedFusion)
    assert first.metadata["target"]["chosen_face"] == 0 and third.metadata["target"]["chosen_face"] == 3
    assert set(first.network_inputs) == set(INPUT_SHAPES)
    for name, shape in INPUT_SHAPES.items():
        assert first.network_inputs[name].shape == shape, name
        assert first.network_inputs[name].dtype == np.float32, name
    # CROPS: the source's crop, then the target's, in the network's layout; GEOMETRY carries the checked degrees.
    np.testing.assert_array_equal(first.network_inputs["CROPS"], np.stack([crop_to_tensor(first.source_crop),
                                                                           crop_to_tensor(first.target_crop)]))
    parts = unpack_geometry(torch.from_numpy(np.stack([first.network_inputs["GEOMETRY"],
                                                       third.network_inputs["GEOMETRY"]])))
    assert parts["FACE_DEGREE"].tolist() == [[100.0], [70.0]] and parts["PROFILE_DEGREE"].tolist() == [[100.0], [30.0]]
    assert first.target_rgb.shape == (886, 1280, 3)
    assert first.metadata["source"]["mesh_presence"] > 0.5 and first.metadata["target"]["mesh_presence"] > 0.5


def test_a_batchs_images_are_kept_once_by_content_with_their_first_role():
    unique = UniqueImages()
    photo = b"\xff\xd8" + bytes(range(256)) * 40
    assert unique.add(photo, "source") == 0
    assert unique.add(bytes(bytearray(photo)), "target") == 0  # equal bytes, another object
    # Same length and same last 4 KiB, different content: the key collides, the comparison tells them apart.
    twin = b"\x00" + photo[1:]
    assert unique.add(twin, "target") == 1 and unique.add(twin, "source") == 1
    assert unique.add(photo[:-1], "target") == 2
    assert unique.images == [photo, twin, photo[:-1]] and unique.roles == ["source", "target", "target"]


def test_a_photo_repeated_across_a_batch_is_decoded_once(preprocessor, hanks_png, group_jpg, monkeypatch):
    decoded = []
    original = preprocessor._decode
    monkeypatch.setattr(preprocessor, "_decode", lambda items: decoded.extend(items) or original(items))
    rows = [FusionRequest(hanks_png, group_jpg, 100, 100, b"{}"),
            FusionRequest(bytes(bytearray(hanks_png)), bytes(bytearray(group_jpg)), 60, 40, b"{}")]
    results = preprocessor.prepare_batch(rows)
    assert all(isinstance(result, PreparedFusion) for result in results)
    assert [role for _, role in decoded] == ["source", "target"]


def test_dense_landmarks_of_aligned_faces_sit_on_the_template(preprocessor, group_jpg):
    from facefuse.alignment import TEMPLATE
    from facefuse.face_mesh import LEFT_EYE, LIPS_OUTER, RIGHT_EYE

    results = preprocessor.prepare_batch([FusionRequest(group_jpg, group_jpg, 50, 50, b'{"source_face": 5}')])
    prepared = results[0]
    assert isinstance(prepared, PreparedFusion)
    mesh = preprocessor.mesh.crop_landmarks(prepared.target_crop[None])[0]
    # Image-left eye is the subject's right eye; template order: image-left eye, image-right eye, nose, mouth.
    assert np.linalg.norm(mesh[list(RIGHT_EYE)].mean(0) - TEMPLATE[0]) < 12
    assert np.linalg.norm(mesh[list(LEFT_EYE)].mean(0) - TEMPLATE[1]) < 12
    assert np.linalg.norm(mesh[list(LIPS_OUTER)].mean(0) - TEMPLATE[3:].mean(0)) < 12


def test_a_tiny_face_is_face_too_small(preprocessor, hanks_png, group_jpg):
    hanks = decode_image(hanks_png)
    canvas = np.full((400, 400, 3), 200, np.uint8)
    canvas[100:130, 100:130] = cv2.resize(hanks, (30, 30), interpolation=cv2.INTER_AREA)
    result = preprocessor.prepare_batch([FusionRequest(encode(canvas), group_jpg, 50, 50, b"{}")])[0]
    if isinstance(result, FusionError) and result.code == errors.NO_FACE_IN_SOURCE:
        pytest.skip("MTCNN did not detect the 30 px face at all, so the size rule was not reached")
    assert isinstance(result, FusionError) and result.code == errors.FACE_TOO_SMALL


def test_local_pipeline_end_to_end(hanks_png, group_jpg):
    engine = LocalFusion(runtime="torch-cpu")
    image, metadata = engine.fuse(hanks_png, group_jpg, 100, 100, {"format": "png", "watermark_id": "1234"})
    fused, target = decode_image(image), decode_image(group_jpg)
    assert fused.shape == target.shape
    assert extract_watermark(fused).watermark_id == "0000000000001234"
    assert json.dumps(metadata)  # serialisable
    assert metadata["timings_ms"]["fusion"] > 0


def test_targets_of_a_request_stack_padded_and_come_back_exactly():
    rng = np.random.default_rng(9)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 60, 3), (55, 30, 3), (40, 60, 3))]
    stacked = stack_images(images)
    assert stacked.shape == (3, 55, 60, 3) and stacked.dtype == np.uint8
    for row, image in zip(stacked, images):
        assert np.array_equal(unpad_image(row, *image.shape[:2]), image)
    assert not stacked[0, 40:].any() and not stacked[1, :, 30:].any()  # the padding is black
    same = stack_images(images[::2])
    assert same.shape == (2, 40, 60, 3)
    with pytest.raises(ValueError, match="smaller than the target"):
        unpad_image(stacked[0], 56, 60)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        unpad_image(stacked[0].astype(np.float32), 10, 10)


def test_device_targets_stack_and_unpad_as_tensors_like_arrays():
    """The GPU handoff stacks and unpads torch tensors on their device: the same layout as the host arrays."""
    import torch

    rng = np.random.default_rng(10)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 60, 3), (55, 30, 3))]
    tensors = [torch.from_numpy(image) for image in images]
    stacked = stack_images(tensors)
    assert isinstance(stacked, torch.Tensor) and stacked.dtype == torch.uint8
    np.testing.assert_array_equal(stacked.numpy(), stack_images(images))
    for row, image in zip(stacked, images):
        back = unpad_image(row, *image.shape[:2])
        assert isinstance(back, torch.Tensor)
        np.testing.assert_array_equal(back.numpy(), image)
    single = stack_images(tensors[:1])
    assert tuple(single.shape) == (1, 40, 60, 3) and single.is_contiguous()
    with pytest.raises(ValueError, match="smaller than the target"):
        unpad_image(stacked[0], 56, 60)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        unpad_image(stacked[0].float(), 10, 10)


def test_warm_up_runs_the_whole_preprocess_on_faces_and_keeps_the_safety_settings():
    """The load-time warm-up prepares real rows (faces detected, crops cut, mesh and splines run), also where the
    deployment requires consent, and leaves the consent policy and blocklist as configured."""
    from facefuse.consent import ConsentPolicy

    policy = ConsentPolicy.parse("required")
    preprocessor = Preprocessor(FaceDetector(max_side=640), FaceMesh(), consent=policy)
    assert preprocessor.warm_up(requests=3) == 3
    assert preprocessor.consent is policy and preprocessor.identity_guard is None
    refused = preprocessor.prepare_batch([FusionRequest(b"x", b"y", 100.0, 100.0, b"{}")])[0]
    assert isinstance(refused, FusionError) and refused.code == errors.CONSENT_REQUIRED

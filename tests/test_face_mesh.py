"""MediaPipe face mesh rebuilt in PyTorch: shapes, ONNX export, parity with the original tflite, plausibility."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from build.face_mesh_parity import run_tflite, sample_faces, tflite_interpreter
from facefuse.alignment import TEMPLATE
from facefuse.face_mesh import (
    FACE_OVAL,
    INPUT_SIZE,
    LEFT_EYE,
    LEFT_EYEBROW,
    LIPS_INNER,
    LIPS_OUTER,
    MESH_POINTS,
    NOSE,
    RIGHT_EYE,
    RIGHT_EYEBROW,
    FaceMesh,
    FaceMeshNet,
    export_onnx,
)


@pytest.fixture(scope="module")
def face_mesh() -> FaceMesh:
    return FaceMesh()


@pytest.fixture(scope="module")
def faces():
    faces = sample_faces()
    assert len(faces) == 7, "expected the 6 faces of t1.jpg and Tom Hanks"
    return faces


@pytest.fixture(scope="module")
def crops(faces) -> np.ndarray:
    return np.stack([face.crop for face in faces])


@pytest.fixture(scope="module")
def results(face_mesh, crops) -> tuple[np.ndarray, np.ndarray]:
    return face_mesh.landmarks_and_presence(crops)


def test_network_shapes(face_mesh):
    assert isinstance(face_mesh.net, FaceMeshNet) and not face_mesh.net.training
    with torch.inference_mode():
        mesh, logit = face_mesh.net(torch.rand(2, 3, 192, 192))
    assert mesh.shape == (2, MESH_POINTS, 3) and logit.shape == (2, 1)


def test_crop_landmarks_shapes_and_sizes(face_mesh, crops, results):
    points, presence = results
    assert points.shape == (7, MESH_POINTS, 2) and points.dtype == np.float32
    assert presence.shape == (7,) and presence.dtype == np.float32
    assert np.array_equal(face_mesh.crop_landmarks(crops[:2]), points[:2])
    assert face_mesh.crop_landmarks(crops[:0]).shape == (0, MESH_POINTS, 2)
    # Any square crop size: the ROI scales with the crop, so a 128-px crop gives the same face at half the scale.
    half = np.stack([cv2.resize(crop, (128, 128), interpolation=cv2.INTER_AREA) for crop in crops])
    assert np.abs(face_mesh.crop_landmarks(half) * 2.0 - points).mean() < 1.5
    with pytest.raises(ValueError):
        face_mesh.crop_landmarks(crops[0])
    with pytest.raises(ValueError):
        face_mesh.crop_landmarks(crops.astype(np.float32))


def test_onnx_export_matches_pytorch(tmp_path, face_mesh, crops):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    path = export_onnx(tmp_path / "face_mesh.onnx", opset=17)
    model = onnx.load(str(path))
    ops = sorted({node.op_type for node in model.graph.node})
    print(f"face mesh ONNX ops: {', '.join(ops)}")
    # The tflite graph's ops plus the final reshape to (B, 468, 3): all in TensorRT's ONNX parser.
    assert set(ops) <= {"Conv", "PRelu", "MaxPool", "Pad", "Add", "Reshape"}
    assert model.opset_import[0].version == 17

    net = face_mesh.net
    patches, _ = face_mesh.prepare(crops[:5])  # a batch size the export never saw
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float().div(255.0).contiguous()
    with torch.inference_mode():
        expected_mesh, expected_logit = net(x)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    mesh, logit = session.run(["landmarks", "presence_logit"], {"image": x.numpy()})
    error = float(np.abs(mesh - expected_mesh.numpy()).max())
    print(f"ONNX Runtime vs PyTorch: max abs landmark error {error:.2e} (192-px units), "
          f"logit {np.abs(logit - expected_logit.numpy()).max():.2e}")
    assert mesh.shape == (5, MESH_POINTS, 3)
    assert error < 1e-3
    assert np.abs(logit - expected_logit.numpy()).max() < 1e-2


def test_parity_with_original_tflite(face_mesh, crops):
    try:
        interpreter = tflite_interpreter()
    except ImportError:
        pytest.skip("no official TFLite interpreter installed (ai-edge-litert==2.3.0 or tflite-runtime); "
                    "it is a test-only dependency")
    patches, _ = face_mesh.prepare(crops)
    ours_mesh, ours_logit = face_mesh.infer(patches)
    ref_mesh, ref_logit = run_tflite(interpreter, patches)
    errors = np.abs(ours_mesh - ref_mesh).max(axis=(1, 2))
    print(f"ours (FaceMesh()) vs tflite per face, max abs (192-px units): {', '.join(f'{e:.1e}' for e in errors)}")
    assert errors.max() < 1e-3
    assert np.abs(ours_logit - ref_logit).max() < 1e-2


def _yaw_proxy(pts: np.ndarray) -> float:
    """Nose tip's offset from the middle of the outer eye corners, in eye-corner distances (0 when frontal)."""
    return float((pts[1, 0] - (pts[33, 0] + pts[263, 0]) / 2.0) / (pts[263, 0] - pts[33, 0]))


def test_landmarks_are_plausible(faces, results):
    points, presence = results
    assert (presence > 0.9).all(), presence
    template_mouth = TEMPLATE[3:].mean(axis=0)
    frontal = 0
    for face, pts in zip(faces, points):
        label = f"{face.image} face {face.index}"
        # The subject's right eye is on the image left (template point 0); MediaPipe names sides by the subject.
        right_eye, left_eye = pts[list(RIGHT_EYE)].mean(axis=0), pts[list(LEFT_EYE)].mean(axis=0)
        # Against where the detector put the eyes in this crop, and the template (looser: a similarity transform
        # cannot put the 5 points of a turned head on the template; worst sample face 12.7 px). The contour centroid
        # of a turned eye is not quite its pupil either (worst 10.5 px from the detector's point).
        assert np.linalg.norm(right_eye - face.landmarks[0]) < 12, label
        assert np.linalg.norm(left_eye - face.landmarks[1]) < 12, label
        assert np.linalg.norm(right_eye - TEMPLATE[0]) < 15, label
        assert np.linalg.norm(left_eye - TEMPLATE[1]) < 15, label
        assert np.linalg.norm(pts[list(LIPS_OUTER)].mean(axis=0) - template_mouth) < 10, label
        assert right_eye[0] < left_eye[0], label
        assert pts[list(RIGHT_EYEBROW)][:, 1].mean() < right_eye[1], label
        assert pts[list(LEFT_EYEBROW)][:, 1].mean() < left_eye[1], label
        # FACE_OVAL is a fixed ring of mesh vertices, not the image silhouette: once the head turns far enough
        # (t1.jpg face 4, yaw proxy 0.37) the nose and the far eye cross it in 2-D. So the full check is for faces
        # turned less than that; 6 of the 7 sample faces qualify.
        oval = pts[list(FACE_OVAL)].reshape(-1, 1, 2)
        inner = pts[list(RIGHT_EYE + LEFT_EYE + NOSE + LIPS_OUTER + LIPS_INNER)]
        # Signed distance to the ring (> 0 inside); the outer eye corner of a slightly turned face sits on it.
        inside = [cv2.pointPolygonTest(oval, (float(x), float(y)), True) for x, y in inner]
        if abs(_yaw_proxy(pts)) < 0.3:
            frontal += 1
            assert min(inside) > -2.0, label
            for group in (RIGHT_EYE, LEFT_EYE, NOSE, LIPS_OUTER):
                centre = pts[list(group)].mean(axis=0)
                assert cv2.pointPolygonTest(oval, (float(centre[0]), float(centre[1])), True) > 5.0, label
    assert frontal >= 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu(crops, results):
    points, presence = FaceMesh("cuda").landmarks_and_presence(crops)
    # cuDNN may use TF32 convolutions: ~0.02 crop px seen on an H200, far below a pixel.
    assert np.abs(points - results[0]).max() < 0.1
    assert np.abs(presence - results[1]).max() < 1e-3


def test_presence_is_low_without_a_face(face_mesh):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    gray = np.full((2, 256, 256, 3), 128, dtype=np.uint8)
    gray[1] = 20
    presence = face_mesh.presence(np.concatenate([noise, gray]))
    assert (presence < 0.5).all(), presence


def test_index_groups():
    assert len(FACE_OVAL) == 36 and len(set(FACE_OVAL)) == 36
    groups = (FACE_OVAL, LEFT_EYE, RIGHT_EYE, LEFT_EYEBROW, RIGHT_EYEBROW, LIPS_OUTER, LIPS_INNER, NOSE)
    assert all(0 <= index < MESH_POINTS for group in groups for index in group)
    assert not set(LEFT_EYE) & set(RIGHT_EYE)
    # Spot checks against MediaPipe's face_mesh_connections.py: forehead and chin, eye and mouth corners.
    assert {10, 152} <= set(FACE_OVAL) and {33, 133} <= set(RIGHT_EYE) and {263, 362} <= set(LEFT_EYE)
    assert {61, 291, 0, 17} <= set(LIPS_OUTER) and 1 in NOSE and 4 in NOSE


def test_onnx_runtime_on_the_cpu_gives_the_pytorch_nets_landmarks(face_mesh, crops):
    """On the CPU the mesh runs in ONNX Runtime by default (facefuse.onnx_cpu); it must be the PyTorch net's result."""
    assert face_mesh.session is not None  # the service's default on a CPU host with onnxruntime installed
    torch_mesh = FaceMesh(runtime="torch")
    assert torch_mesh.session is None
    points, presence = face_mesh.landmarks_and_presence(crops)
    torch_points, torch_presence = torch_mesh.landmarks_and_presence(crops)
    assert np.abs(points - torch_points).max() < 1e-2  # crop pixels
    assert np.abs(presence - torch_presence).max() < 1e-4
    with pytest.raises(ValueError, match="runtime must be one of"):
        FaceMesh(runtime="tflite")


@pytest.mark.parametrize("runtime", ["auto", "torch"])
def test_crops_as_tensors_are_prepared_on_their_device_like_opencv(face_mesh, crops, results, runtime):
    """The GPU path hands the mesh its crops as device tensors: the ROI warp runs there (grid_sample at OpenCV's
    1/32-px positions) instead of cv2 on the host; within a grey level of cv2's patches, the same landmarks."""
    mesh = face_mesh if runtime == "auto" else FaceMesh(runtime="torch")
    patches, _ = mesh.prepare(crops)
    on_device = mesh.prepare_tensor(torch.from_numpy(crops))
    assert on_device.shape == (len(crops), 3, INPUT_SIZE, INPUT_SIZE) and on_device.dtype == torch.float32
    levels = (on_device * 255.0).round().to(torch.int16).permute(0, 2, 3, 1).numpy()
    difference = np.abs(levels - patches.astype(np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.02
    points, presence = mesh.landmarks_and_presence(torch.from_numpy(crops))
    assert np.abs(points - results[0]).max() < 0.1  # crop pixels (seen: 0.04)
    assert np.abs(presence - results[1]).max() < 1e-3
    with pytest.raises(ValueError, match="uint8"):
        mesh.landmarks_and_presence(torch.from_numpy(crops).float())

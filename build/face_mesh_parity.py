"""Parity of facefuse.face_mesh.FaceMeshNet with the original face_landmark.tflite on the sample faces.

Usage: python -m build.face_mesh_parity

For each of the 7 faces in the shipped sample photos (MTCNN detection -> aligned crop -> FaceMesh's fixed ROI), the
same 192x192 input goes through the PyTorch module and through the official TFLite interpreter (ai-edge-litert, or
tflite-runtime). Prints the max/mean abs difference of the 468x3 landmark outputs (192-px units), both presence
scores, and the ROI MediaPipe's tracking would pick next from the predicted landmarks (a check of FaceMesh's ROI).
Exits 1 if any difference exceeds the tolerance.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import cv2
import numpy as np

from facefuse.alignment import alignment_matrix, transform_points, warp_to_crop
from facefuse.face_mesh import FaceMesh, tflite_path

TOLERANCE = 1e-3  # max abs landmark difference, 192-px units
SAMPLES = ("t1.jpg", "Tom_Hanks_54745.png")


@dataclass
class SampleFace:
    image: str
    index: int
    crop: np.ndarray  # (256, 256, 3) uint8 RGB aligned crop
    landmarks: np.ndarray  # (5, 2) the detector's landmarks mapped into the crop


def sample_faces() -> list[SampleFace]:
    """Every face MTCNN finds in the shipped sample photos, as aligned crops (6 in t1.jpg, 1 Tom Hanks)."""
    from facefuse.detection import FaceDetector
    from facefuse.samples import sample_image_path

    detector = FaceDetector()
    faces = []
    for name in SAMPLES:
        rgb = cv2.cvtColor(cv2.imread(str(sample_image_path(name)), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        detected = sorted(detector.detect(rgb), key=lambda face: float(face.landmarks[:, 0].mean()))  # left to right
        for index, face in enumerate(detected):
            matrix = alignment_matrix(face.landmarks)
            faces.append(SampleFace(name, index, warp_to_crop(rgb, matrix), transform_points(matrix, face.landmarks)))
    return faces


def tflite_interpreter():  # -> ai_edge_litert / tflite_runtime Interpreter (untyped: optional dependency)
    """The official TFLite interpreter on face_landmark.tflite; ImportError if neither package is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter  # the older wheel name of the same runtime
    interpreter = Interpreter(model_path=str(tflite_path()))
    interpreter.allocate_tensors()
    return interpreter


def run_tflite(interpreter, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B,192,192,3) uint8 -> ((B,468,3) landmarks, (B,) presence logits) from the original model (batch 1 only)."""
    input_index = interpreter.get_input_details()[0]["index"]
    outputs = {tuple(d["shape"])[-1]: d["index"] for d in interpreter.get_output_details()}  # 1404 mesh, 1 flag
    meshes, logits = [], []
    for patch in patches:
        # Same input convention as FaceMesh: RGB in [0, 1], NHWC.
        interpreter.set_tensor(input_index, patch[None].astype(np.float32) / np.float32(255.0))
        interpreter.invoke()
        meshes.append(interpreter.get_tensor(outputs[1404]).reshape(-1, 3))
        logits.append(float(interpreter.get_tensor(outputs[1]).reshape(-1)[0]))
    return np.stack(meshes), np.array(logits, dtype=np.float32)


def tracking_roi(points: np.ndarray) -> tuple[float, float, float]:
    """MediaPipe's next ROI from landmarks (face_landmark_landmarks_to_roi.pbtxt): box centre, 1.5 x long side."""
    low, high = points.min(axis=0), points.max(axis=0)
    centre = (low + high) / 2.0
    return float(centre[0]), float(centre[1]), float(1.5 * (high - low).max())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def main() -> int:
    started = time.perf_counter()
    faces = sample_faces()
    mesh = FaceMesh(runtime="torch")  # our PyTorch rebuild against the original tflite
    try:
        interpreter = tflite_interpreter()
    except ImportError:
        print("[parity] no TFLite interpreter: pip install ai-edge-litert==2.3.0 (test-only dependency)",
              file=sys.stderr)
        return 2
    patches, _ = mesh.prepare(np.stack([face.crop for face in faces]))
    torch_mesh, torch_logits = mesh.infer(patches)
    tflite_mesh, tflite_logits = run_tflite(interpreter, patches)
    points, _ = mesh.landmarks_and_presence(np.stack([face.crop for face in faces]))

    print(f"[parity] {tflite_path()}")
    print(f"{'image':<22}{'face':>5}{'max |d|':>11}{'mean |d|':>11}{'presence':>10}{'logit':>8}{'tflite':>8}"
          f"{'|d|':>9}   tracking ROI in crop (cx, cy, side)")
    worst = 0.0
    rois = []
    for face, ours, theirs, logit, ref_logit, pts in zip(
        faces, torch_mesh, tflite_mesh, torch_logits, tflite_logits, points,
    ):
        diff = np.abs(ours - theirs)
        worst = max(worst, float(diff.max()))
        rois.append(tracking_roi(pts))
        cx, cy, side = rois[-1]
        print(f"{face.image:<22}{face.index:>5}{diff.max():>11.2e}{diff.mean():>11.2e}{_sigmoid(logit):>10.6f}"
              f"{logit:>8.2f}{ref_logit:>8.2f}{abs(logit - ref_logit):>9.1e}   ({cx:6.1f}, {cy:6.1f}, {side:6.1f})")
    mean_roi = np.mean(rois, axis=0)
    print(f"[parity] worst landmark difference {worst:.2e} (tolerance {TOLERANCE:.0e}); mean tracking ROI "
          f"({mean_roi[0]:.1f}, {mean_roi[1]:.1f}, {mean_roi[2]:.1f}); {time.perf_counter() - started:.1f} s")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())

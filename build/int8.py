"""Optional INT8 flow for the fusion network. It NEEDS TensorRT (the `tensorrt` Python package and a CUDA GPU).

1. Calibration set (any machine, CPU only): real network inputs from facefuse.pipeline.Preprocessor over pairs of
   faces of the shipped sample photos (t1.jpg's six faces and Tom_Hanks_54745.png), each photo augmented (horizontal
   flip, brightness/contrast, small rotation/scale, JPEG re-encode), degrees spread over 0..100. Seeded, so the
   same seed gives the same arrays. Two splits drawn from separate random streams, so held-out rows never share
   an augmentation with calibration rows: ``calibration.npz`` and ``held_out.npz`` (keys = the ONNX input names,
   float32, (rows, *INPUT_SHAPES[name])) plus ``calibration_set.json`` (what each row is), under ``out/int8/``.
2. With TensorRT (polygraphy): an entropy calibrator over batches of OPT_BATCH calibration rows writes
   ``calibration.cache``; an INT8 engine (FP16 fallback for layers without INT8 kernels) and an FP16 engine are
   built from the ONNX with the serving batch profile of build/tensorrt.py; both and ONNX Runtime FP32 (CPU) run
   the held-out rows, and ``report.md`` / ``report.csv`` give FUSED_CROP max/mean absolute error in grey levels
   (x255) and PSNR, and BLEND_MASK max absolute error, INT8 and FP16 against FP32 and INT8 against FP16.
   To serve INT8 afterwards: ``python -m build.tensorrt --int8 --calibration-cache out/int8/calibration.cache``
   with the same TensorRT version. (Implicit calibration is deprecated since TensorRT 10.1; it still builds.)
3. Without TensorRT: one line saying so, the calibration set written, no engine built, exit 3.

Usage: python -m build.int8 [--onnx model_repository/fusion/1/model.onnx] [--out out/int8] [--seed 0]
                            [--calibration-variants 12] [--held-out-variants 4] [--calibration-only]

Exit status: 0 engines built and compared, or ``--calibration-only`` and the set written; 1 failure (an ONNX whose
inputs differ from facefuse.network.INPUT_SHAPES, a TensorRT build error, no ONNX file where TensorRT is present);
2 bad arguments; 3 (EXIT_NO_TENSORRT) TensorRT not importable: calibration set written, no engine built.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx

from build.tensorrt import (
    MAX_BATCH,
    MIN_BATCH,
    ONNX_RELPATH,
    OPT_BATCH,
    REPO_ROOT,
    WORKSPACE_MIB,
    Log,
    onnx_input_dims,
    shape_profiles,
)
from build.trt_ops import unsupported_ops
from facefuse.fusion_runtime import OnnxRuntimeCpu
from facefuse.network import INPUT_NAMES, INPUT_SHAPES, OUTPUT_NAMES
from facefuse.samples import SAMPLE_IMAGES

EXIT_NO_TENSORRT = 3  # distinct from 1 (failure) and 2 (argparse usage errors)
DEFAULT_OUT = REPO_ROOT / "out" / "int8"  # out/ is git-ignored
CALIBRATION, HELD_OUT = "calibration", "held_out"
# One random stream per split: held-out augmentations are independent draws, never the calibration ones.
SPLIT_STREAMS = {CALIBRATION: 0, HELD_OUT: 1}
GROUP_PHOTO, PORTRAIT = SAMPLE_IMAGES  # t1.jpg, Tom_Hanks_54745.png
GROUP_FACES = 6  # faces the detector finds in t1.jpg
ROWS_PER_VARIANT = 8
DEFAULT_CALIBRATION_VARIANTS = 12  # 96 rows = 12 calibration batches of OPT_BATCH
DEFAULT_HELD_OUT_VARIANTS = 4  # 32 rows
INT8_PLAN, FP16_PLAN, CACHE_NAME = "fusion_int8.plan", "fusion_fp16.plan", "calibration.cache"
REFERENCE = "FP32 (ONNX Runtime CPU)"

Arrays = dict[str, np.ndarray]
Infer = Callable[[Arrays], Mapping[str, np.ndarray]]


def _print(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Augmentations


@dataclass(frozen=True)
class Augmentation:
    """One photo's augmentation; the identity by default. Geometry, then photometry, then the encoding, in the
    order a real photo goes through them."""

    flip: bool = False
    rotate_deg: float = 0.0
    scale: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0  # grey levels added after the contrast stretch about mid-grey
    jpeg_quality: int | None = None  # None: lossless PNG, so only the other changes reach the detector

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Augmentation:
        """Small changes only: large rotations or scales would lose faces and change the face indices."""
        return cls(
            flip=bool(rng.random() < 0.5),
            rotate_deg=round(float(rng.uniform(-10.0, 10.0)), 2),
            scale=round(float(rng.uniform(0.85, 1.15)), 3),
            contrast=round(float(rng.uniform(0.7, 1.3)), 3),
            brightness=round(float(rng.uniform(-35.0, 35.0)), 1),
            jpeg_quality=int(rng.integers(35, 96)) if rng.random() < 0.6 else None,
        )

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """The augmented (H,W,3) uint8 RGB image, same size, before any encoding."""
        out = np.ascontiguousarray(rgb[:, ::-1]) if self.flip else rgb
        if self.rotate_deg or self.scale != 1.0:
            height, width = out.shape[:2]
            matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), self.rotate_deg, self.scale)
            # Replicated borders: a reflected border could mirror a face into an extra detection.
            out = cv2.warpAffine(out, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if self.contrast != 1.0 or self.brightness:
            stretched = (out.astype(np.float32) - 128.0) * self.contrast + 128.0 + self.brightness
            out = np.clip(np.rint(stretched), 0, 255).astype(np.uint8)
        return out

    def encode(self, rgb: np.ndarray) -> bytes:
        """Augment and encode: the bytes a client would send (JPEG at `jpeg_quality`, else PNG)."""
        bgr = cv2.cvtColor(self.apply(rgb), cv2.COLOR_RGB2BGR)
        if self.jpeg_quality is None:
            ok, data = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        else:
            ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise RuntimeError("OpenCV could not encode an augmented sample photo")
        return data.tobytes()

    def describe(self) -> str:
        if self == Augmentation():
            return "original"
        parts = ["flip"] if self.flip else []
        parts += [f"rot {self.rotate_deg:+.1f}deg", f"scale {self.scale:.2f}", f"contrast {self.contrast:.2f}",
                  f"bright {self.brightness:+.0f}", f"jpeg q{self.jpeg_quality}" if self.jpeg_quality else "png"]
        return " ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Calibration set


@dataclass
class CalibrationSplit:
    """One split's network inputs (name -> (rows, *INPUT_SHAPES[name]) float32) and what each row is."""

    name: str
    arrays: Arrays
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # requests the preprocessor refused, with the code

    def __len__(self) -> int:
        return len(self.rows)


def spread_degrees(count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, 2) face/profile degrees: a Latin hypercube over [0,100]^2 (every 1/count stratum of each degree used
    once), with the corners (0,0), (100,100), (0,100), (100,0) on the first rows: the clamps and the all-off mask
    are where reduced precision is most likely to show."""
    strata = [(rng.permutation(count) + rng.uniform(size=count)) / count * 100.0 for _ in range(2)]
    degrees = np.round(np.stack(strata, axis=1), 2)
    corners = np.array([[0.0, 0.0], [100.0, 100.0], [0.0, 100.0], [100.0, 0.0]])
    degrees[: min(count, 4)] = corners[: min(count, 4)]
    return degrees.astype(np.float32)


def variant_pairs(rng: np.random.Generator) -> list[tuple[str, int, str, int]]:
    """ROWS_PER_VARIANT (source photo, source face, target photo, target face): four pairs between t1.jpg's faces
    and four between the portrait and a t1 face, both ways; which faces varies with the variant."""
    faces = [int(face) for face in rng.permutation(GROUP_FACES)]
    group = [(faces[0], faces[1]), (faces[2], faces[3]), (faces[4], faces[5]), (faces[1], faces[4])]
    pairs = [(GROUP_PHOTO, source, GROUP_PHOTO, target) for source, target in group]
    pairs += [(PORTRAIT, 0, GROUP_PHOTO, faces[0]), (GROUP_PHOTO, faces[3], PORTRAIT, 0),
              (PORTRAIT, 0, GROUP_PHOTO, faces[5]), (GROUP_PHOTO, faces[2], PORTRAIT, 0)]
    return pairs


def load_photos() -> dict[str, np.ndarray]:
    """The shipped sample photos as decoded by the service (orientation applied, RGB uint8)."""
    from facefuse.imaging import decode_image
    from facefuse.samples import sample_image_path

    return {name: decode_image(sample_image_path(name).read_bytes()) for name in (GROUP_PHOTO, PORTRAIT)}


def cpu_preprocessor() -> Any:
    """The service's Preprocessor with MTCNN and the face mesh on the CPU: the set needs no GPU."""
    from facefuse.detection import FaceDetector
    from facefuse.face_mesh import FaceMesh
    from facefuse.pipeline import Preprocessor

    return Preprocessor(FaceDetector(device="cpu"), FaceMesh(device="cpu"))


def build_split(preprocessor: Any, name: str, variants: int, seed: int, photos: Mapping[str, np.ndarray],
                log: Log = _print) -> CalibrationSplit:
    """`variants` x ROWS_PER_VARIANT requests through the preprocessor; rows it refuses (a face lost to the
    augmentation) are listed in `skipped`, not replaced, so the set stays a pure function of the seed.

    Calibration variant 0 is the unaugmented photos; every other variant draws each photo's augmentation."""
    from facefuse.errors import FusionError
    from facefuse.pipeline import FusionRequest

    if variants < 1:
        raise ValueError(f"{name}: need at least one variant, got {variants}")
    rng = np.random.default_rng([seed, SPLIT_STREAMS[name]])
    degrees = spread_degrees(variants * ROWS_PER_VARIANT, rng)
    columns: dict[str, list[np.ndarray]] = {input_name: [] for input_name in INPUT_NAMES}
    split = CalibrationSplit(name, {})
    for variant in range(variants):
        started = time.perf_counter()
        original = name == CALIBRATION and variant == 0
        augmentations = {photo: Augmentation() if original else Augmentation.sample(rng) for photo in photos}
        encoded = {photo: augmentations[photo].encode(rgb) for photo, rgb in photos.items()}
        pairs = variant_pairs(rng)
        requests, described = [], []
        for index, (source, source_face, target, target_face) in enumerate(pairs):
            face_degree, profile_degree = (float(d) for d in degrees[variant * ROWS_PER_VARIANT + index])
            options = json.dumps({"source_face": source_face, "target_face": target_face}).encode()
            requests.append(FusionRequest(encoded[source], encoded[target], face_degree, profile_degree, options))
            described.append({
                "split": name, "variant": variant, "source": source, "source_face": source_face,
                "source_augmentation": asdict(augmentations[source]), "target": target, "target_face": target_face,
                "target_augmentation": asdict(augmentations[target]), "face_degree": face_degree,
                "profile_degree": profile_degree,
            })
        # One batch per variant: the preprocessor decodes and detects each augmented photo once.
        kept = 0
        for row, result in zip(described, preprocessor.prepare_batch(requests)):
            if isinstance(result, FusionError):
                split.skipped.append({**row, "error": result.code})
                continue
            for input_name in INPUT_NAMES:
                columns[input_name].append(np.asarray(result.network_inputs[input_name], np.float32))
            split.rows.append(row)
            kept += 1
        log(f"[int8] {name} variant {variant + 1}/{variants}: {kept}/{len(requests)} rows in "
            f"{time.perf_counter() - started:.1f} s ({GROUP_PHOTO}: {augmentations[GROUP_PHOTO].describe()}; "
            f"{PORTRAIT}: {augmentations[PORTRAIT].describe()})")
    if not split.rows:
        raise RuntimeError(f"{name}: the preprocessor refused every request; no calibration rows")
    split.arrays = {input_name: np.stack(values) for input_name, values in columns.items()}
    check_arrays(split.arrays)
    return split


def build_calibration_set(preprocessor: Any, seed: int = 0, calibration_variants: int = DEFAULT_CALIBRATION_VARIANTS,
                          held_out_variants: int = DEFAULT_HELD_OUT_VARIANTS,
                          log: Log = _print) -> dict[str, CalibrationSplit]:
    """Both splits, calibration first."""
    photos = load_photos()
    return {
        CALIBRATION: build_split(preprocessor, CALIBRATION, calibration_variants, seed, photos, log),
        HELD_OUT: build_split(preprocessor, HELD_OUT, held_out_variants, seed, photos, log),
    }


def check_arrays(arrays: Mapping[str, np.ndarray]) -> int:
    """Row count of a set whose keys, dtypes and per-row shapes are the network's inputs; ValueError otherwise."""
    if set(arrays) != set(INPUT_NAMES):
        raise ValueError(f"calibration arrays {sorted(arrays)} are not the network inputs {sorted(INPUT_NAMES)}")
    counts = {len(array) for array in arrays.values()}
    if len(counts) != 1:
        raise ValueError(f"calibration arrays have different row counts: {sorted(counts)}")
    for name, array in arrays.items():
        if array.dtype != np.float32 or array.shape[1:] != INPUT_SHAPES[name]:
            raise ValueError(f"{name}: {array.dtype} {array.shape[1:]}, expected float32 {INPUT_SHAPES[name]}")
    return counts.pop()


def save_set(splits: Mapping[str, CalibrationSplit], out_dir: Path, seed: int) -> dict[str, Path]:
    """``<split>.npz`` per split (compressed: the crops are 8-bit values) and ``calibration_set.json``; each written
    under a temporary name and moved into place, so an interrupted run leaves no half file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, split in splits.items():
        path = out_dir / f"{name}.npz"
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as handle:  # a file object: np.savez would append ".npz" to a partial name
            np.savez_compressed(handle, **split.arrays)
        os.replace(partial, path)
        paths[name] = path
    manifest = {
        "seed": seed,
        "rows_per_variant": ROWS_PER_VARIANT,
        "inputs": {name: list(shape) for name, shape in INPUT_SHAPES.items()},
        "splits": {name: {"file": paths[name].name, "rows": split.rows, "skipped": split.skipped}
                   for name, split in splits.items()},
    }
    manifest_path = out_dir / "calibration_set.json"
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    paths["manifest"] = manifest_path
    return paths


def load_split(path: Path) -> Arrays:
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    check_arrays(arrays)
    return arrays


# ---------------------------------------------------------------------------------------------------------------
# The calibrator's data loader


class CalibrationLoader:
    """Feed dicts (input name -> (batch, ...) float32) over the calibration rows, for polygraphy's Calibrator.

    TensorRT calibrates a dynamic-shape network at the calibration profile's OPT shape, so every batch has exactly
    `batch` rows; the last one wraps around to the first rows instead of being dropped. Re-iterable (a generator
    would be spent after one calibration)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], batch: int = OPT_BATCH) -> None:
        self.rows = check_arrays(arrays)
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.arrays = {name: np.ascontiguousarray(arrays[name]) for name in INPUT_NAMES}
        self.batch = batch
        self.input_metadata: Any = None  # polygraphy sets this (TensorMetadata); we already know the shapes

    def __len__(self) -> int:
        return math.ceil(self.rows / self.batch)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.rows, self.batch):
            index = np.arange(start, start + self.batch) % self.rows
            yield {name: np.ascontiguousarray(array[index]) for name, array in self.arrays.items()}


# ---------------------------------------------------------------------------------------------------------------
# Accuracy comparison (runtime-agnostic: tested on the CPU with ONNX Runtime)


@dataclass(frozen=True)
class Comparison:
    candidate: str
    reference: str
    rows: int
    fused_max_abs_grey: float  # FUSED_CROP, x255: grey levels of the 8-bit result
    fused_mean_abs_grey: float
    fused_psnr_db: float  # over every held-out pixel (peak 1.0); inf when identical
    fused_worst_row_psnr_db: float  # the worst single row: one bad face matters more than the average
    mask_max_abs: float  # BLEND_MASK, in 0..1


def psnr_db(mse: float) -> float:
    return math.inf if mse <= 0.0 else 10.0 * math.log10(1.0 / mse)


def compare(candidate_name: str, candidate: Mapping[str, np.ndarray], reference_name: str,
            reference: Mapping[str, np.ndarray]) -> Comparison:
    fused = candidate["FUSED_CROP"].astype(np.float64) - reference["FUSED_CROP"].astype(np.float64)
    mask = candidate["BLEND_MASK"].astype(np.float64) - reference["BLEND_MASK"].astype(np.float64)
    row_mse = (fused**2).reshape(len(fused), -1).mean(axis=1)
    return Comparison(
        candidate=candidate_name,
        reference=reference_name,
        rows=len(fused),
        fused_max_abs_grey=float(np.abs(fused).max() * 255.0),
        fused_mean_abs_grey=float(np.abs(fused).mean() * 255.0),
        fused_psnr_db=psnr_db(float(row_mse.mean())),
        fused_worst_row_psnr_db=psnr_db(float(row_mse.max())),
        mask_max_abs=float(np.abs(mask).max()),
    )


def run_batched(infer: Infer, arrays: Mapping[str, np.ndarray], batch: int = OPT_BATCH) -> Arrays:
    """All rows through `infer` in batches (within the engine profile), outputs concatenated as float32."""
    rows = check_arrays(arrays)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
    for start in range(0, rows, batch):
        outputs = infer({name: np.ascontiguousarray(arrays[name][start:start + batch]) for name in INPUT_NAMES})
        for name in OUTPUT_NAMES:
            chunks[name].append(np.asarray(outputs[name], np.float32))
    return {name: np.concatenate(values) for name, values in chunks.items()}


def onnxruntime_infer(onnx_path: Path) -> Infer:
    """The FP32 reference: the service's ONNX Runtime CPU runtime, the one the parity tests trust."""
    return OnnxRuntimeCpu(onnx_path).run


def comparisons(outputs: Mapping[str, Arrays], pairs: Sequence[tuple[str, str]]) -> list[Comparison]:
    """(candidate, reference) names of `outputs` -> one Comparison each."""
    return [compare(candidate, outputs[candidate], reference, outputs[reference]) for candidate, reference in pairs]


def write_report(out_dir: Path, rows: Sequence[Comparison], context: Sequence[str]) -> tuple[Path, Path]:
    """``report.csv`` (one line per comparison) and ``report.md`` (the same table after `context` lines)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "report.csv", out_dir / "report.md"
    names = [f.name for f in Comparison.__dataclass_fields__.values()]
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for row in rows:
            writer.writerow([f"{value:.6g}" if isinstance(value, float) else value for value in asdict(row).values()])
    lines = ["# Fusion network: INT8 vs FP16 vs FP32", "", *context, "",
             "| candidate | reference | rows | FUSED_CROP max abs (grey levels) | mean abs (grey levels) | PSNR (dB) "
             "| worst-row PSNR (dB) | BLEND_MASK max abs |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.candidate} | {r.reference} | {r.rows} | {r.fused_max_abs_grey:.2f} | {r.fused_mean_abs_grey:.3f} "
              f"| {r.fused_psnr_db:.2f} | {r.fused_worst_row_psnr_db:.2f} | {r.mask_max_abs:.4f} |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


# ---------------------------------------------------------------------------------------------------------------
# TensorRT (polygraphy)


def tensorrt_import_error() -> str | None:
    """None when `tensorrt` imports; else why not."""
    try:
        import tensorrt  # noqa: F401  (optional, absent on CPU machines)
    except (ImportError, OSError) as error:  # OSError: the wheel is there but libnvinfer is not loadable
        return f"{type(error).__name__}: {error}"
    return None


def check_onnx_inputs(onnx_path: Path) -> dict[str, tuple[int, ...]]:
    """The ONNX graph's per-row input dims, which must be the network's INPUT_SHAPES the set was built for."""
    dims = onnx_input_dims(onnx.load(str(onnx_path), load_external_data=False))
    if dims != dict(INPUT_SHAPES):
        raise ValueError(f"{onnx_path} inputs {dims} differ from facefuse.network.INPUT_SHAPES {dict(INPUT_SHAPES)}; "
                         "export the ONNX again (make onnx)")
    return dims


def build_and_compare(onnx_path: Path, splits: Mapping[str, Arrays], out_dir: Path, *,
                      workspace_mib: int = WORKSPACE_MIB, log: Log = _print) -> tuple[Path, Path]:
    """Calibrate, build the INT8 (+FP16 fallback) and FP16 engines, run the held-out rows on both and on ONNX Runtime
    FP32, write the report; returns (report.md, report.csv). Needs `tensorrt` and a CUDA GPU."""
    import polygraphy
    import tensorrt as trt
    from polygraphy.backend.trt import (
        Calibrator,
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        SaveEngine,
        TrtRunner,
    )

    dims = check_onnx_inputs(onnx_path)
    missing = unsupported_ops(onnx.load(str(onnx_path), load_external_data=False))
    if missing:
        raise ValueError(f"{onnx_path} uses ops TensorRT's ONNX parser cannot import: {missing}")
    # The serving profile of build/tensorrt.py; polygraphy calibrates on the last profile, at its OPT shapes.
    profile = Profile()
    for name, (low, opt, high) in shape_profiles(dims, MIN_BATCH, OPT_BATCH, MAX_BATCH).items():
        profile.add(name, min=low, opt=opt, max=high)
    pools = {trt.MemoryPoolType.WORKSPACE: workspace_mib << 20}
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path, int8_path, fp16_path = out_dir / CACHE_NAME, out_dir / INT8_PLAN, out_dir / FP16_PLAN
    # A cache present would be replayed and calibration skipped; a fresh set deserves fresh scales.
    cache_path.unlink(missing_ok=True)
    loader = CalibrationLoader(splits[CALIBRATION], OPT_BATCH)
    calibrator = Calibrator(loader, cache=str(cache_path))
    # TF32 on, as TensorRT's own default that build/tensorrt.py keeps (polygraphy turns it off unless asked).
    builds = {
        "INT8": (int8_path, CreateConfig(tf32=True, fp16=True, int8=True, calibrator=calibrator, profiles=[profile],
                                         memory_pool_limits=pools)),
        "FP16": (fp16_path, CreateConfig(tf32=True, fp16=True, profiles=[profile], memory_pool_limits=pools)),
    }
    engines, build_s = {}, {}
    for label, (path, config) in builds.items():
        extra = f", calibrating on {len(loader)} batches of {OPT_BATCH}" if label == "INT8" else ""
        log(f"[int8] building the {label} engine {path} (TensorRT {trt.__version__}, batch "
            f"{MIN_BATCH}/{OPT_BATCH}/{MAX_BATCH}{extra}); minutes")
        started = time.perf_counter()
        engines[label] = SaveEngine(EngineFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config),
                                    path=str(path))()
        build_s[label] = time.perf_counter() - started
        log(f"[int8] {label} engine built in {build_s[label]:.0f} s ({path.stat().st_size / 2**20:.1f} MiB)")
    if not cache_path.is_file():
        raise RuntimeError(f"TensorRT built the INT8 engine but wrote no calibration cache at {cache_path}")

    held_out = splits[HELD_OUT]
    outputs: dict[str, Arrays] = {}
    for label, engine in engines.items():
        log(f"[int8] running {len(held_out[INPUT_NAMES[0]])} held-out rows on the {label} engine")
        with TrtRunner(engine) as runner:
            outputs[label] = run_batched(lambda feeds, runner=runner: runner.infer(feeds), held_out)
    log("[int8] running the held-out rows on ONNX Runtime FP32 (CPU)")
    outputs[REFERENCE] = run_batched(onnxruntime_infer(onnx_path), held_out)
    rows = comparisons(outputs, [("INT8", REFERENCE), ("FP16", REFERENCE), ("INT8", "FP16")])
    calibration_rows = len(splits[CALIBRATION][INPUT_NAMES[0]])
    context = [
        f"TensorRT {trt.__version__}, polygraphy {polygraphy.__version__}; ONNX `{onnx_path}`; batch profile "
        f"{MIN_BATCH}/{OPT_BATCH}/{MAX_BATCH} (build/tensorrt.py).",
        f"Calibration: {calibration_rows} rows ({len(loader)} batches of {OPT_BATCH}), entropy calibrator; cache "
        f"`{cache_path}`. Held out: {len(held_out[INPUT_NAMES[0]])} rows from other augmentations "
        "(calibration_set.json says which).",
        f"Engines: INT8+FP16 `{int8_path}` ({build_s['INT8']:.0f} s), FP16 `{fp16_path}` ({build_s['FP16']:.0f} s).",
        "Errors are absolute, FUSED_CROP in grey levels (x255) of the 256x256 crop; PSNR with peak 1.0.",
        f"Serve INT8 (same TensorRT version): `python -m build.tensorrt --int8 --calibration-cache {cache_path}`.",
    ]
    md_path, csv_path = write_report(out_dir, rows, context)
    for row in rows:
        log(f"[int8] {row.candidate} vs {row.reference}: FUSED_CROP max {row.fused_max_abs_grey:.2f} / mean "
            f"{row.fused_mean_abs_grey:.3f} grey levels, PSNR {row.fused_psnr_db:.1f} dB; BLEND_MASK max "
            f"{row.mask_max_abs:.4f}")
    return md_path, csv_path


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m build.int8",
                                     description="INT8 calibration set, engines and accuracy report (needs TensorRT).")
    parser.add_argument("--onnx", type=Path, default=REPO_ROOT / ONNX_RELPATH)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default out/int8 (git-ignored)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-variants", type=int, default=DEFAULT_CALIBRATION_VARIANTS,
                        help=f"augmented photo pairs for calibration, {ROWS_PER_VARIANT} rows each")
    parser.add_argument("--held-out-variants", type=int, default=DEFAULT_HELD_OUT_VARIANTS,
                        help=f"augmented photo pairs held out for the comparison, {ROWS_PER_VARIANT} rows each")
    parser.add_argument("--workspace-mib", type=int, default=WORKSPACE_MIB)
    parser.add_argument("--calibration-only", action="store_true",
                        help="write the calibration set and stop (exit 0 with or without TensorRT)")
    args = parser.parse_args(argv)
    if args.calibration_variants < 1 or args.held_out_variants < 1:
        parser.error("--calibration-variants and --held-out-variants must be >= 1")
    return args


def main(argv: Sequence[str] | None = None, preprocessor: Any = None) -> int:
    """`preprocessor` lets tests pass one they already built (the detector and mesh take seconds to load)."""
    args = _parse_args(argv)
    log = functools.partial(print, flush=True)
    started = time.perf_counter()
    try:
        # Refuse a stale ONNX before minutes of work; without TensorRT the ONNX is not needed at all.
        if args.onnx.is_file():
            check_onnx_inputs(args.onnx)
        log(f"[int8] building the calibration set (seed {args.seed}, {args.calibration_variants} calibration + "
            f"{args.held_out_variants} held-out variants of {ROWS_PER_VARIANT} face pairs) on the CPU")
        splits = build_calibration_set(preprocessor or cpu_preprocessor(), args.seed, args.calibration_variants,
                                       args.held_out_variants, log)
        paths = save_set(splits, args.out, args.seed)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"INT8: calibration set failed: {error}", file=sys.stderr)
        return 1
    written = f"{paths[CALIBRATION]} ({len(splits[CALIBRATION])} rows) and {paths[HELD_OUT]} " \
              f"({len(splits[HELD_OUT])} rows)"
    log(f"[int8] calibration set written in {time.perf_counter() - started:.1f} s: {written}")
    if args.calibration_only:
        log(f"INT8: --calibration-only: calibration set written to {written}, no engine built")
        return 0
    reason = tensorrt_import_error()
    if reason is not None:
        print(f"INT8 needs TensorRT (Python package `tensorrt` not importable: {reason}): calibration set written "
              f"to {written}, no engine built", file=sys.stderr, flush=True)
        return EXIT_NO_TENSORRT
    if not args.onnx.is_file():
        print(f"INT8: no ONNX model at {args.onnx}; export it first (make onnx)", file=sys.stderr)
        return 1
    try:
        md_path, csv_path = build_and_compare(
            args.onnx, {name: split.arrays for name, split in splits.items()}, args.out,
            workspace_mib=args.workspace_mib, log=log)
    except Exception as error:  # TensorRT and polygraphy fail with many types; say which and exit 1
        print(f"INT8: engine build or comparison failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    log(f"INT8: built {args.out / INT8_PLAN} and {args.out / FP16_PLAN}; report {md_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

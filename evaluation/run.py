"""Evaluate our pipeline against the classic landmark morph on every ordered pair of shipped sample faces.

    python -m evaluation.run --out out/eval [--limit-pairs N] [--runtime auto|torch-cpu|...] [--threads N]

For each ordered pair of distinct faces (a face of t1.jpg may be fused into another face of t1.jpg) and each
(face, profile) degree setting in DEGREES, both methods fuse the source face into the target face and are judged
by evaluation.metrics. Our pipeline is called only through ``facefuse.engine.LocalFusion.fuse``; the faces are
the ones our MTCNN detector finds (largest = index 0), and the baseline is handed the same boxes.

Writes ``results.csv`` (one row per method x pair x degrees), ``contact_sheet.png`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from evaluation import dlib_models
from evaluation.baseline import classic_fuse
from evaluation.metrics import identity_distances, intended_landmarks, landmark_error, seam_metrics
from facefuse.detection import PROPOSAL_CHOICES
from facefuse.engine import FUSION_MODEL_DIR, LocalFusion
from facefuse.errors import FusionError
from facefuse.imaging import decode_image
from facefuse.samples import sample_image_path

DEGREES: tuple[tuple[float, float], ...] = ((0, 0), (50, 50), (100, 100), (100, 0), (0, 100))
CHAIN = ((0, 0), (50, 50), (100, 100))  # the monotonicity chain: both degrees raised together
PHOTOS = ("t1.jpg", "Tom_Hanks_54745.png")
METHODS = ("ours", "classic")
# Stages of ours that are I/O or provenance rather than fusion work (the classic baseline does none of them).
OURS_IO_STAGES = ("decode", "watermark", "encode")
METRICS = ("dist_source", "dist_target", "landmark_error", "seam", "seam_vs_target")
# Yardstick of DESIGN.md section 6 at full degree.
TARGET_DIST_SOURCE, TARGET_DIST_TARGET = 0.40, 0.60
CELL = 120  # contact-sheet crop size (pixels)


@dataclass(eq=False)
class Face:
    """One sample face as our detector sees it, with dlib's view of it (the judge's reference)."""

    photo: str
    index: int
    data: bytes
    rgb: np.ndarray
    box: np.ndarray  # MTCNN box (x1, y1, x2, y2)

    @property
    def name(self) -> str:
        return f"{pathlib.Path(self.photo).stem.split('_')[0]}#{self.index}"

    # dlib's view, computed on first use (a short run needs only the faces of its pairs).
    @functools.cached_property
    def landmarks68(self) -> np.ndarray:
        return dlib_models.landmarks68(self.rgb, self.box)

    @functools.cached_property
    def descriptor(self) -> np.ndarray:
        return dlib_models.descriptor(self.rgb, self.box)

    @functools.cached_property
    def dlib_confirmed(self) -> bool:
        """Whether dlib's own HOG detector also finds this face."""
        return dlib_models.face_rectangle(self.rgb, self.box)[1]


@dataclass
class Outcome:
    """One method's run on one pair at one degree setting."""

    method: str
    source: Face
    target: Face
    degrees: tuple[float, float]
    fused: np.ndarray | None = None
    network: str = ""  # fusion network version from METADATA (ours only)
    error: str = ""
    stages_ms: dict[str, float] = field(default_factory=dict)
    total_ms: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)

    def row(self, stages: Sequence[str]) -> dict[str, Any]:
        row: dict[str, Any] = {
            "method": self.method, "source": self.source.name, "target": self.target.name,
            "face_degree": self.degrees[0], "profile_degree": self.degrees[1],
            "status": "error" if self.error else "ok", "error": self.error,
        }
        row.update({name: _fmt(self.metrics.get(name, math.nan)) for name in METRICS})
        row["changed_px"] = _fmt(self.metrics.get("changed_px", math.nan), 0)
        row["total_ms"] = _fmt(self.total_ms, 2)
        for stage in stages:
            row[f"ms_{stage}"] = _fmt(self.stages_ms.get(stage, math.nan), 2)
        row["source_dlib_confirmed"] = int(self.source.dlib_confirmed)
        row["target_dlib_confirmed"] = int(self.target.dlib_confirmed)
        return row


def _fmt(value: float, digits: int = 4) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def load_faces(detect: Callable[[np.ndarray], list[Any]]) -> list[Face]:
    """Every face our detector finds in the sample photos, in its order (largest first)."""
    faces = []
    for photo in PHOTOS:
        data = sample_image_path(photo).read_bytes()
        rgb = decode_image(data)
        faces.extend(Face(photo, index, data, rgb, np.asarray(detected.box, np.float64))
                     for index, detected in enumerate(detect(rgb)))
    return faces


def default_runtime() -> str:
    """ONNX Runtime (via "auto") once `make build` has exported the model, else PyTorch on the CPU."""
    return "auto" if (FUSION_MODEL_DIR / "model.onnx").is_file() else "torch-cpu"


def run_ours(engine: LocalFusion, source: Face, target: Face, degrees: tuple[float, float]) -> Outcome:
    outcome = Outcome("ours", source, target, degrees)
    options = {"source_face": source.index, "target_face": target.index, "format": "png"}
    started = time.perf_counter()
    try:
        encoded, metadata = engine.fuse(source.data, target.data, degrees[0], degrees[1], options)
    except FusionError as error:
        outcome.error = error.code
        return outcome
    except Exception as error:  # noqa: BLE001 - the network is being reworked; record the failure, keep going
        outcome.error = f"{type(error).__name__}: {error}"[:200]
        return outcome
    outcome.total_ms = (time.perf_counter() - started) * 1000.0
    outcome.stages_ms = {k: float(v) for k, v in metadata.get("timings_ms", {}).items()}
    outcome.network = str(metadata.get("versions", {}).get("fusion_network", ""))
    outcome.fused = decode_image(encoded)  # outside the timed span: the baseline hands back pixels, not bytes
    return outcome


def run_classic(source: Face, target: Face, degrees: tuple[float, float]) -> Outcome:
    outcome = Outcome("classic", source, target, degrees)
    started = time.perf_counter()
    try:
        outcome.fused, outcome.stages_ms = classic_fuse(source.rgb, target.rgb, degrees[0], degrees[1],
                                                        source.box, target.box)
    except Exception as error:  # noqa: BLE001 - one bad face must not stop the evaluation
        outcome.error = f"{type(error).__name__}: {error}"[:200]
        return outcome
    outcome.total_ms = (time.perf_counter() - started) * 1000.0
    return outcome


def measure(outcome: Outcome) -> None:
    """Fill ``outcome.metrics``; a metric that fails is recorded as an error, not raised."""
    if outcome.fused is None:
        return
    source, target = outcome.source, outcome.target
    if outcome.fused.shape != target.rgb.shape:
        outcome.error = f"SIZE_MISMATCH: {outcome.fused.shape} vs {target.rgb.shape}"
        return
    try:
        d_source, d_target = identity_distances(outcome.fused, target.box, source.descriptor, target.descriptor)
        intended = intended_landmarks(source.landmarks68, target.landmarks68, outcome.degrees[1])
        outcome.metrics = {"dist_source": d_source, "dist_target": d_target,
                           "landmark_error": landmark_error(outcome.fused, target.box, intended),
                           **seam_metrics(outcome.fused, target.rgb, target.box)}
    except Exception as error:  # noqa: BLE001
        outcome.error = f"METRIC_FAILED: {type(error).__name__}: {error}"[:200]


# ----------------------------------------------------------------------------------------------------------- output

def write_csv(path: pathlib.Path, outcomes: Sequence[Outcome]) -> None:
    # Stage columns: whatever stages the methods report (the pipeline may add some), in order of appearance.
    stages = list(dict.fromkeys(stage for outcome in outcomes for stage in outcome.stages_ms))
    rows = [outcome.row(stages) for outcome in outcomes]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["method"])
        writer.writeheader()
        writer.writerows(rows)


def _crop(rgb: np.ndarray, box: np.ndarray, size: int = CELL) -> np.ndarray:
    """Square crop around a face box grown by 30%, padded where it leaves the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = 1.3 * max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    scale = size / side
    matrix = np.array([[scale, 0.0, size / 2.0 - scale * cx], [0.0, scale, size / 2.0 - scale * cy]])
    return cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(40, 40, 40))


def _text(canvas: np.ndarray, text: str, x: int, y: int, scale: float = 0.4,
          colour: tuple[int, int, int] = (20, 20, 20)) -> None:
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def contact_sheet(outcomes: Sequence[Outcome], pairs: Sequence[tuple[Face, Face]]) -> np.ndarray:
    """Rows: pair x method; columns: source, target, then one fused crop per degree setting with its scores."""
    label_w, header_h, caption_h, gap = 140, 40, 28, 8
    columns = 2 + len(DEGREES)
    rows = [(pair, method) for pair in pairs for method in METHODS]
    width = label_w + columns * (CELL + gap)
    height = header_h + len(rows) * (CELL + caption_h + gap)
    sheet = np.full((height, width, 3), 255, np.uint8)
    _text(sheet, "fused columns: face degree / profile degree;  under each: dlib distance to the source (s) and to"
                 " the target (t), seam", 4, 13, 0.36)
    headers = ["source", "target"] + [f"{f:.0f} / {p:.0f}" for f, p in DEGREES]
    for column, header in enumerate(headers):
        _text(sheet, header, label_w + column * (CELL + gap) + 2, header_h - 6, 0.45)
    index = {(o.method, o.source.name, o.target.name, o.degrees): o for o in outcomes}
    for row, ((source, target), method) in enumerate(rows):
        y = header_h + row * (CELL + caption_h + gap)
        _text(sheet, f"{source.name} -> {target.name}", 4, y + 40, 0.45)
        _text(sheet, method, 4, y + 60, 0.5, (0, 0, 160) if method == "ours" else (0, 110, 0))
        cells = [_crop(source.rgb, source.box), _crop(target.rgb, target.box)]
        captions: list[tuple[str, str]] = [("", ""), ("", "")]
        for degrees in DEGREES:
            outcome = index.get((method, source.name, target.name, degrees))
            if outcome is None or outcome.fused is None:
                cells.append(np.full((CELL, CELL, 3), 200, np.uint8))
                captions.append((outcome.error[:20] if outcome else "not run", ""))
                continue
            cells.append(_crop(outcome.fused, target.box))
            m = outcome.metrics
            # ASCII only: OpenCV's Hershey fonts have no dash or ellipsis.
            captions.append((f"s {_cell(m.get('dist_source', math.nan), 2, 'n/a')}"
                             f"  t {_cell(m.get('dist_target', math.nan), 2, 'n/a')}",
                             f"seam {_cell(m.get('seam', math.nan), 2, 'n/a')}"))
        for column, (cell, caption) in enumerate(zip(cells, captions)):
            x = label_w + column * (CELL + gap)
            sheet[y:y + CELL, x:x + CELL] = cell
            _text(sheet, caption[0], x + 2, y + CELL + 12, 0.36)
            _text(sheet, caption[1], x + 2, y + CELL + 25, 0.36)
    return sheet


def sheet_pairs(pairs: Sequence[tuple[Face, Face]], count: int) -> list[tuple[Face, Face]]:
    """A few representative pairs: across photos in both directions first, then within one photo."""
    chosen: list[tuple[Face, Face]] = []
    first_photo = pairs[0][0].photo if pairs else ""
    for wanted in (lambda s, t: s.photo == first_photo != t.photo,
                   lambda s, t: s.photo != first_photo == t.photo):
        match = next((pair for pair in pairs if wanted(*pair) and pair not in chosen), None)
        if match is not None and len(chosen) < count:
            chosen.append(match)
    # Then pairs within one photo (a group shot's faces differ in pose and light), spread over the list.
    rest = [pair for pair in pairs if pair not in chosen and pair[0].photo == pair[1].photo]
    rest = rest or [pair for pair in pairs if pair not in chosen]
    for position in np.linspace(0, len(rest) - 1, max(0, count - len(chosen))).round().astype(int):
        if rest and rest[position] not in chosen:
            chosen.append(rest[position])
    return chosen[:count]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan


def _cell(value: float, digits: int = 3, missing: str = "–") -> str:
    return missing if not math.isfinite(value) else f"{value:.{digits}f}"


def summarise(outcomes: Sequence[Outcome], faces: Sequence[Face], pairs: Sequence[tuple[Face, Face]],
              info: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """summary.md text and the headline numbers (for the caller and tests)."""
    by_key = {(o.method, o.source.name, o.target.name, o.degrees): o for o in outcomes}
    lines = ["# Fusion quality: our pipeline vs the classic landmark morph", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [f"- faces: {len(faces)} ({', '.join(f.name for f in faces)}); ordered pairs evaluated: {len(pairs)};"
              f" degree settings (face, profile): {', '.join(f'({f:.0f},{p:.0f})' for f, p in DEGREES)}",
              "- judge: dlib ResNet descriptor, Euclidean distance (same person < 0.6), measured inside the target"
              " face's box of the fused image; landmark error = mean distance of dlib's 68 points on the fused face"
              " to (1-p)*T + p*S_aligned, over the outer-eye-corner distance (the classic morph builds its shape from"
              " these same dlib points, which flatters its landmark error); seam = mean |gradient| on the outline"
              " of the changed region / just inside it (evaluation/metrics.py; lower is better, ~1 = no visible"
              " seam); seam vs target = the outline's gradient / the same band's gradient in the target (~1 = no"
              " edge added, a hard paste gives > 1.2)",
              "- time per face: wall-clock ms of one fusion. ours = `LocalFusion.fuse` from encoded bytes to encoded"
              " PNG (every stage the pipeline runs, e.g. decode, MTCNN on both photos, landmarks, align, network,"
              " paste, watermark, encode); classic = from"
              " decoded RGB and our boxes to RGB (dlib landmarks incl. a local HOG search, align, triangulate,"
              " warp, dissolve + seamlessClone), i.e. without decoding, face detection or encoding", ""]
    headline: dict[str, Any] = {}

    lines += ["## Means per method and degree setting", "",
              "| method | face / profile | ok runs | dist → source ↓ | dist → target | landmark err ↓ | seam ↓ |"
              " seam vs target ↓ | ms / face (median) ↓ |",
              "|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for degrees in DEGREES:
            runs = [o for o in outcomes if o.method == method and o.degrees == degrees]
            ok = [o for o in runs if not o.error]
            means = {name: _mean([o.metrics.get(name, math.nan) for o in ok]) for name in METRICS}
            ms = _median([o.total_ms for o in ok])
            headline[(method, degrees)] = {**means, "ms": ms, "ok": len(ok), "runs": len(runs)}
            seam_n = sum(1 for o in ok if math.isfinite(o.metrics.get("seam", math.nan)))
            lines.append(f"| {method} | {degrees[0]:.0f} / {degrees[1]:.0f} | {len(ok)}/{len(runs)} |"
                         f" {_cell(means['dist_source'])} | {_cell(means['dist_target'])} |"
                         f" {_cell(means['landmark_error'])} | {_cell(means['seam'], 2)} (n={seam_n}) |"
                         f" {_cell(means['seam_vs_target'], 2)} | {_cell(ms, 0)} |")

    def d(method: str, source: Face, target: Face, degrees: tuple[float, float], name: str) -> float:
        outcome = by_key.get((method, source.name, target.name, degrees))
        return outcome.metrics.get(name, math.nan) if outcome and not outcome.error else math.nan

    def count(method: str, test: Callable[[Face, Face], bool | None]) -> tuple[int, int]:
        results = [test(s, t) for s, t in pairs]
        known = [r for r in results if r is not None]
        return sum(known), len(known)

    def strictly(values: list[float], decreasing: bool) -> bool | None:
        if not all(math.isfinite(v) for v in values):
            return None
        steps = np.diff(values)
        return bool(np.all(steps < 0) if decreasing else np.all(steps > 0))

    checks = {
        "dist → source falls (0,0)→(50,50)→(100,100)":
            lambda m, s, t: strictly([d(m, s, t, g, "dist_source") for g in CHAIN], True),
        "dist → target rises (0,0)→(50,50)→(100,100)":
            lambda m, s, t: strictly([d(m, s, t, g, "dist_target") for g in CHAIN], False),
        "face degree alone lowers dist → source: (0,0)→(100,0) and (0,100)→(100,100)":
            lambda m, s, t: _both(strictly([d(m, s, t, (0, 0), "dist_source"),
                                            d(m, s, t, (100, 0), "dist_source")], True),
                                  strictly([d(m, s, t, (0, 100), "dist_source"),
                                            d(m, s, t, (100, 100), "dist_source")], True)),
        "profile degree alone lowers dist → source: (0,0)→(0,100) and (100,0)→(100,100)":
            lambda m, s, t: _both(strictly([d(m, s, t, (0, 0), "dist_source"),
                                            d(m, s, t, (0, 100), "dist_source")], True),
                                  strictly([d(m, s, t, (100, 0), "dist_source"),
                                            d(m, s, t, (100, 100), "dist_source")], True)),
        "profile degree alone moves the shape: (0,100) landmark error < the unchanged target's":
            lambda m, s, t: strictly([_unchanged_error(s, t), d(m, s, t, (0, 100), "landmark_error")], True),
    }
    lines += ["", "## Monotonicity per pair (strict; pairs where every run of the method succeeded)", "",
              "| check | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for title, check in checks.items():
        cells = []
        for method in METHODS:
            passed, known = count(method, lambda s, t, check=check, method=method: check(method, s, t))
            headline[(method, title)] = (passed, known)
            cells.append(f"{passed}/{known}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")

    lines += ["", "## Time per face by stage (ms, median over successful runs)", "",
              "| method | total | stages |", "|---|---|---|"]
    for method in METHODS:
        ok = [o for o in outcomes if o.method == method and not o.error]
        total = _median([o.total_ms for o in ok])
        headline[(method, "ms")] = total
        names = list(dict.fromkeys(stage for o in ok for stage in o.stages_ms))
        stages = [f"{name} {_cell(_median([o.stages_ms.get(name, math.nan) for o in ok]), 1)}" for name in names]
        lines.append(f"| {method} | {_cell(total, 1)} | " + " · ".join(stages) + " |")
    ours_ok = [o for o in outcomes if o.method == "ours" and not o.error]
    core = _median([sum(v for k, v in o.stages_ms.items() if k not in OURS_IO_STAGES) for o in ours_ok])
    no_detect = _median([sum(v for k, v in o.stages_ms.items() if k not in (*OURS_IO_STAGES, "detect"))
                         for o in ours_ok])
    headline[("ours", "core_ms")] = core
    headline[("ours", "no_detect_ms")] = no_detect
    lines.append(f"\nours without {'/'.join(OURS_IO_STAGES)}: {_cell(core, 1)} ms; without detection too (comparable"
                 f" to classic, which is handed our boxes): {_cell(no_detect, 1)} ms. Medians, because other"
                 " processes on the machine cause bursts.")

    failures = [o for o in outcomes if o.error]
    unconfirmed = [f.name for f in faces if not f.dlib_confirmed]
    lines += ["", "## Failures", "",
              f"- runs that failed: {len(failures)} of {len(outcomes)}"
              + "".join(f"\n  - {o.method} {o.source.name} -> {o.target.name} {o.degrees}: {o.error}"
                        for o in failures[:30])
              + ("\n  - …" if len(failures) > 30 else ""),
              f"- faces our detector found that dlib's HOG detector did not confirm (judged with a box converted"
              f" from ours instead): {len(unconfirmed)}" + (f" ({', '.join(unconfirmed)})" if unconfirmed else "")]

    full = headline.get(("ours", (100, 100)), {})
    classic_full = headline.get(("classic", (100, 100)), {})
    chain_title = "dist → source falls (0,0)→(50,50)→(100,100)"
    face_title = "face degree alone lowers dist → source: (0,0)→(100,0) and (0,100)→(100,100)"
    profile_title = "profile degree alone lowers dist → source: (0,0)→(0,100) and (100,0)→(100,100)"
    paired = [(by_key.get(("ours", s.name, t.name, g)), by_key.get(("classic", s.name, t.name, g)))
              for s, t in pairs for g in DEGREES]
    seams = [(a.metrics["seam"], b.metrics["seam"]) for a, b in paired
             if a and b and math.isfinite(a.metrics.get("seam", math.nan))
             and math.isfinite(b.metrics.get("seam", math.nan))]
    seam_ours, seam_classic = _mean([a for a, _ in seams]), _mean([b for _, b in seams])
    ms_ours, ms_classic = headline.get(("ours", "ms"), math.nan), headline.get(("classic", "ms"), math.nan)

    def verdict(ok: bool) -> str:
        return "**yes**" if ok else "**no**"

    def monotone(method: str, title: str) -> str:
        passed, known = headline.get((method, title), (0, 0))
        return f"{passed}/{known}"

    lines += ["", "## Against the yardstick (DESIGN.md §6)", "",
              "| criterion | ours | classic | met by ours |", "|---|---|---|---|",
              f"| (100,100) mean dist → source ≤ {TARGET_DIST_SOURCE} | {_cell(full.get('dist_source', math.nan))} |"
              f" {_cell(classic_full.get('dist_source', math.nan))} |"
              f" {verdict(full.get('dist_source', math.nan) <= TARGET_DIST_SOURCE)} |",
              f"| (100,100) mean dist → target > {TARGET_DIST_TARGET} | {_cell(full.get('dist_target', math.nan))} |"
              f" {_cell(classic_full.get('dist_target', math.nan))} |"
              f" {verdict(full.get('dist_target', math.nan) > TARGET_DIST_TARGET)} |",
              f"| monotonic, both degrees together (pairs) | {monotone('ours', chain_title)} |"
              f" {monotone('classic', chain_title)} | {verdict(_all(headline.get(('ours', chain_title))))} |",
              f"| monotonic in the face degree (pairs) | {monotone('ours', face_title)} |"
              f" {monotone('classic', face_title)} | {verdict(_all(headline.get(('ours', face_title))))} |",
              f"| monotonic in the profile degree (pairs) | {monotone('ours', profile_title)} |"
              f" {monotone('classic', profile_title)} | {verdict(_all(headline.get(('ours', profile_title))))} |",
              f"| seam no worse than the baseline (mean over {len(seams)} runs where both are defined) |"
              f" {_cell(seam_ours, 2)} | {_cell(seam_classic, 2)} | {verdict(seam_ours <= seam_classic)} |",
              f"| faster per face than the baseline (ms) | {_cell(ms_ours, 0)} | {_cell(ms_classic, 0)} |"
              f" {verdict(ms_ours < ms_classic)} |",
              f"| … same, ours without {'/'.join(OURS_IO_STAGES)}/detect (ms) |"
              f" {_cell(headline.get(('ours', 'no_detect_ms'), math.nan), 0)} | {_cell(ms_classic, 0)} |"
              f" {verdict(headline.get(('ours', 'no_detect_ms'), math.nan) < ms_classic)} |", ""]
    headline["paired_seam"] = (seam_ours, seam_classic, len(seams))
    return "\n".join(lines) + "\n", headline


def _unchanged_error(source: Face, target: Face) -> float:
    """Landmark error the untouched target face would score against the profile-100 shape (the shape gap)."""
    intended = intended_landmarks(source.landmarks68, target.landmarks68, 100)
    interocular = float(np.linalg.norm(intended[36] - intended[45]))
    return float(np.linalg.norm(target.landmarks68 - intended, axis=1).mean() / max(interocular, 1e-6))


def _both(a: bool | None, b: bool | None) -> bool | None:
    return None if a is None or b is None else a and b


def _all(counts: tuple[int, int] | None) -> bool:
    return bool(counts) and counts[1] > 0 and counts[0] == counts[1]


# ------------------------------------------------------------------------------------------------------------- main

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/eval"))
    parser.add_argument("--limit-pairs", type=int, default=None, help="evaluate only the first N ordered pairs")
    parser.add_argument("--runtime", default=None,
                        help="fusion runtime for LocalFusion (default: auto when model.onnx exists, else torch-cpu)")
    parser.add_argument("--sheet-pairs", type=int, default=4, help="pairs shown on the contact sheet")
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch and OpenCV threads during the run (default 1: the yardstick is per core, and"
                             " on a shared machine extra threads only oversubscribe it; 0 = the libraries' choice)")
    parser.add_argument("--proposals", choices=PROPOSAL_CHOICES, default="auto",
                        help="where the detector's candidate faces come from (preprocess parameter "
                             "detector_proposals)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    saved = torch.get_num_threads(), cv2.getNumThreads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    try:
        return _evaluate(args)
    finally:  # leave the process as it was (tests run in one process)
        torch.set_num_threads(saved[0])
        cv2.setNumThreads(saved[1])


def _evaluate(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    runtime_choice = args.runtime or default_runtime()
    started = time.perf_counter()
    engine = LocalFusion(runtime=runtime_choice, detector_proposals=args.proposals)
    # The service's own detector: face indices are its order (largest first), which depends on its settings (at
    # 640 and 1280 px two faces of t1.jpg of nearly equal size swap places).
    faces = load_faces(engine.preprocessor.detector.detect)
    pairs = [(s, t) for s in faces for t in faces if s is not t]
    if args.limit_pairs is not None:
        pairs = pairs[:max(0, args.limit_pairs)]
    print(f"[eval] {len(faces)} faces, {len(pairs)} ordered pairs x {len(DEGREES)} degree settings x "
          f"{len(METHODS)} methods; runtime {runtime_choice!r}", flush=True)
    shown = sheet_pairs(pairs, args.sheet_pairs)
    if pairs:  # warm-up (first calls pay for lazy initialisation), not recorded
        run_ours(engine, *pairs[0], (50, 50))
        run_classic(*pairs[0], (50, 50))

    outcomes: list[Outcome] = []
    network = "unknown"
    for number, (source, target) in enumerate(pairs, 1):
        pair_outcomes = []
        for degrees in DEGREES:
            for outcome in (run_ours(engine, source, target, degrees), run_classic(source, target, degrees)):
                measure(outcome)
                pair_outcomes.append(outcome)
        network = next((o.network for o in pair_outcomes if o.network), network)
        outcomes.extend(pair_outcomes)
        if (source, target) not in shown:
            for outcome in pair_outcomes:
                outcome.fused = None  # keep memory flat: only the contact sheet's pairs keep their pixels
        print(_progress(number, len(pairs), source, target, pair_outcomes), flush=True)

    runtime_name = getattr(engine.runtime, "name", type(engine.runtime).__name__)
    info = {
        "generated": datetime.datetime.now().isoformat(timespec="seconds"),
        "fusion runtime": f"{runtime_name} (requested {runtime_choice!r}); network {network}",
        "detector proposals": f"{engine.preprocessor.detector.proposals} (requested {args.proposals!r})",
        "machine": f"{os.cpu_count()} CPU cores; Python {sys.version.split()[0]}; both methods run interleaved in"
                   f" one process, so CPU contention affects them alike; threads: PyTorch {torch.get_num_threads()},"
                   f" OpenCV {cv2.getNumThreads()}, dlib 1, ONNX Runtime its own"
                   " default",
        "wall time of the evaluation": f"{time.perf_counter() - started:.0f} s",
    }
    write_csv(args.out / "results.csv", outcomes)
    sheet = contact_sheet(outcomes, shown)
    cv2.imwrite(str(args.out / "contact_sheet.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    text, _ = summarise(outcomes, faces, pairs, info)
    (args.out / "summary.md").write_text(text)
    print(f"[eval] wrote {args.out / 'results.csv'}, {args.out / 'contact_sheet.png'}, {args.out / 'summary.md'}")
    return 0


def _progress(number: int, total: int, source: Face, target: Face, outcomes: Sequence[Outcome]) -> str:
    parts = [f"[{number:3d}/{total}] {source.name:>6} -> {target.name:<6}"]
    for method in METHODS:
        mine = [o for o in outcomes if o.method == method]
        chain = [next((o for o in mine if o.degrees == g), None) for g in CHAIN]
        dists = "/".join("err" if o is None or o.error else _cell(o.metrics.get("dist_source", math.nan), 2)
                         for o in chain)
        errors = sum(1 for o in mine if o.error)
        ms = _median([o.total_ms for o in mine])
        parts.append(f"{method}: d_src {dists} {_cell(ms, 0)} ms" + (f" ({errors} failed)" if errors else ""))
    return "  ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo`: start the local Triton server, fuse the shipped sample photos in several pairs and degrees,
write every result and a contact sheet to out/, then stop the server."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from client.api import FusionClient, FusionServerError
from facefuse.imaging import decode_image
from facefuse.local_server import Ports, start, stop_process
from facefuse.samples import sample_image_path


@dataclass(frozen=True)
class DemoPair:
    name: str
    source: str
    source_face: int
    target: str
    target_face: int


PAIRS = (
    DemoPair("hanks_into_t1-face0", "Tom_Hanks_54745.png", 0, "t1.jpg", 0),
    DemoPair("t1-face0_into_hanks", "t1.jpg", 0, "Tom_Hanks_54745.png", 0),
    DemoPair("t1-face2_into_t1-face1", "t1.jpg", 2, "t1.jpg", 1),
    DemoPair("t1-face4_into_t1-face3", "t1.jpg", 4, "t1.jpg", 3),
)
DEGREES = ((0.0, 0.0), (50.0, 50.0), (100.0, 100.0))
TILE = 192


def _face_tile(rgb: np.ndarray, box: list[float], size: int = TILE) -> np.ndarray:
    """A square crop around a face box (with margin), resized to a tile."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * 1.8
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    right, bottom = int(min(rgb.shape[1], cx + side / 2)), int(min(rgb.shape[0], cy + side / 2))
    return cv2.resize(rgb[top:bottom, left:right], (size, size), interpolation=cv2.INTER_AREA)


def _caption(tile: np.ndarray, text: str) -> np.ndarray:
    out = tile.copy()
    cv2.rectangle(out, (0, 0), (out.shape[1], 18), (0, 0, 0), -1)
    cv2.putText(out, text, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def run_demo(out_dir: Path, ports: Ports, protocol: str = "grpc") -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    server = start(ports, out_dir / "triton.log")
    rows, failures = [], 0
    try:
        url = f"localhost:{ports.grpc if protocol == 'grpc' else ports.http}"
        with FusionClient(url, protocol) as client:
            for pair in PAIRS:
                source = sample_image_path(pair.source).read_bytes()
                target = sample_image_path(pair.target).read_bytes()
                tiles = []
                for face_degree, profile_degree in DEGREES:
                    options = {"source_face": pair.source_face, "target_face": pair.target_face}
                    started = time.perf_counter()
                    try:
                        result = client.fuse(source, target, face_degree, profile_degree, options)
                    except FusionServerError as error:
                        print(f"[demo] {pair.name} at {face_degree:.0f}/{profile_degree:.0f}: {error}")
                        failures += 1
                        continue
                    elapsed = (time.perf_counter() - started) * 1000
                    path = out_dir / f"{pair.name}_{face_degree:.0f}-{profile_degree:.0f}.jpg"
                    path.write_bytes(result.image)
                    meta = result.metadata
                    print(f"[demo] {path} ({elapsed:.0f} ms end to end; server stages "
                          f"{json.dumps(meta['timings_ms'])})", flush=True)
                    if not tiles:
                        source_rgb = decode_image(source)
                        source_box = meta["source"]["faces"][pair.source_face]["box"]
                        tiles.append(_caption(_face_tile(source_rgb, source_box), f"source {pair.source}"))
                    target_box = meta["target"]["faces"][pair.target_face]["box"]
                    tiles.append(_caption(_face_tile(decode_image(result.image), target_box),
                                          f"face {face_degree:.0f} / profile {profile_degree:.0f}"))
                if tiles:
                    tiles += [np.zeros_like(tiles[0])] * (1 + len(DEGREES) - len(tiles))
                    rows.append(np.hstack(tiles))
    finally:
        stop_process(server)
    if rows:
        sheet = np.vstack(rows)
        sheet_path = out_dir / "contact_sheet.png"
        cv2.imwrite(str(sheet_path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        print(f"[demo] contact sheet: {sheet_path} (rows: {', '.join(p.name for p in PAIRS)}; "
              f"columns: source, then degrees {', '.join(f'{a:.0f}/{b:.0f}' for a, b in DEGREES)})")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    args = parser.parse_args(argv)
    try:
        return run_demo(args.out, Ports.from_env(), args.protocol)
    except RuntimeError as error:
        print(f"[demo] {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

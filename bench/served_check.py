"""Served results against in-process ones on this host (e.g. the GPU path, where preprocess hands TARGET_RGB to
postprocess in GPU memory): the face_fusion ensemble on the local Triton server, called over HTTP with the v2
binary protocol (plain urllib: GPU hosts without tritonclient can run it), and facefuse.engine.LocalFusion on the
same pairs; prints each pair's PSNR between the two decoded results, exits 1 when any request fails or any PSNR is
below --min-psnr.

    python -m bench.served_check [--pairs 8] [--device cuda] [--min-psnr 40]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.inputs import benchmark_pairs
from facefuse.imaging import decode_image
from facefuse.local_server import MODEL_REPOSITORY, REPO_ROOT, free_ports, start, stop_process

_HEADER = "Inference-Header-Content-Length"


def _bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data  # a BYTES tensor of one element: its 4-byte length, then the bytes


def infer_http(url: str, source: bytes, target: bytes, face_degree: float, profile_degree: float,
               options: dict) -> tuple[bytes, dict]:
    """(fused image bytes, metadata) from face_fusion over HTTP; RuntimeError with the server's message on failure."""
    binary = {"SOURCE_IMAGE": _bytes_element(source), "TARGET_IMAGE": _bytes_element(target),
              "OPTIONS": _bytes_element(json.dumps(options).encode())}
    inputs = [{"name": name, "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(data)}}
              for name, data in binary.items()]
    inputs += [{"name": name, "shape": [1, 1], "datatype": "FP32", "data": [value]}
               for name, value in (("FACE_DEGREE", face_degree), ("PROFILE_DEGREE", profile_degree))]
    header = json.dumps({"inputs": inputs, "outputs": [{"name": name, "parameters": {"binary_data": True}}
                                                       for name in ("FUSED_IMAGE", "METADATA")]}).encode()
    request = urllib.request.Request(f"{url}/v2/models/face_fusion/infer", data=header + b"".join(binary.values()),
                                     headers={_HEADER: str(len(header)), "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            body, json_size = response.read(), int(response.headers[_HEADER])
    except urllib.error.HTTPError as error:
        raise RuntimeError(error.read().decode(errors="replace")) from error
    reply, position, values = json.loads(body[:json_size]), json_size, {}
    for output in reply["outputs"]:
        size = output["parameters"]["binary_data_size"]
        raw = body[position:position + size]
        position += size
        values[output["name"]] = raw[4:4 + struct.unpack("<I", raw[:4])[0]]
    return values["FUSED_IMAGE"], json.loads(values["METADATA"])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="distinct 1080p pairs, sent at once (one batch)")
    parser.add_argument("--device", default="cpu", help="LocalFusion's device for the in-process reference")
    parser.add_argument("--min-psnr", type=float, default=40.0)
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    args = parser.parse_args(argv)
    from facefuse.engine import LocalFusion

    pairs = benchmark_pairs(args.pairs)
    options = {"target_face": 0, "watermark_id": "00000000c0ffee00"}  # one id: the two results are comparable
    ports = free_ports()
    server = start(ports, REPO_ROOT / "out" / "served-check-triton.log", model_repository=args.model_repository)
    try:
        url = f"http://127.0.0.1:{ports.http}"
        with ThreadPoolExecutor(len(pairs)) as pool:  # concurrent: the rows meet in dynamic batches
            served = list(pool.map(lambda pair: infer_http(url, *pair, 100.0, 100.0, options), pairs))
    finally:
        stop_process(server)
    engine = LocalFusion(device=args.device)
    worst = float("inf")
    for number, ((source, target), (image, metadata)) in enumerate(zip(pairs, served)):
        local, _ = engine.fuse(source, target, 100.0, 100.0, options)
        value = psnr(decode_image(image), decode_image(local))
        worst = min(worst, value)
        print(f"[served-check] pair {number}: {len(image)} bytes, PSNR served vs in process {value:.1f} dB, "
              f"server timings_ms {metadata['timings_ms']}", flush=True)
    print(f"[served-check] {len(pairs)} pairs, worst PSNR {worst:.1f} dB (need >= {args.min_psnr})", flush=True)
    return 0 if worst >= args.min_psnr else 1


if __name__ == "__main__":
    sys.exit(main())

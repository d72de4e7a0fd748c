"""The TPS solve of preprocess's geometry step, per method and batch size: the GPU's LU of the whole system, its
Cholesky on the polynomials' null space (facefuse.geometry._fit_tps_torch), and numpy's LU on the host.

    python -m bench.profile_tps [--device cuda] [--rows 1,4,8,16] [--repeats 20]

Each figure is per call (the rows of one preprocess batch: a system of CONTROL_COUNT + 3 unknowns each): wall ms
with the upload and the download (the host's wait included), and on the GPU the ms of kernels and copies and the
kernel launches (torch.profiler), which is what the call costs the other processes sharing the GPU.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np
import torch

from bench.profile_request import gpu_work
from facefuse.geometry import CONTROL_COUNT, CROP_SIZE, TPS_REGULARISATION, _fit_tps_torch, fit_tps_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    for count in (int(value) for value in args.rows.split(",")):
        centres = rng.uniform(10, CROP_SIZE - 10, size=(count, CONTROL_COUNT, 2))
        values = rng.uniform(0, CROP_SIZE, size=(count, CONTROL_COUNT, 4))
        reference = fit_tps_batch(centres, values)
        calls = {"host numpy": functools.partial(fit_tps_batch, centres, values)}
        for method in ("lu", "cholesky"):
            calls[f"{device.type} {method}"] = functools.partial(
                _fit_tps_torch, centres / CROP_SIZE, values, TPS_REGULARISATION, str(device), method)
        for name, call in calls.items():
            error = float(np.abs(call() - reference).max() / np.abs(reference).max())  # also the warm-up
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                call()
                times.append((time.perf_counter() - started) * 1000.0)
            gpu = ""
            if device.type == "cuda" and name != "host numpy":
                gpu_ms, launches, _ = gpu_work(call, device)
                gpu = f"; GPU {gpu_ms:.3f} ms in {launches} launches"
            print(f"[tps] {count:3d} rows  {name:14s} wall {statistics.median(times):7.3f} ms (median of "
                  f"{args.repeats}){gpu}; max relative difference from numpy {error:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The fusion network alone: faces/s and peak GPU memory at batch 1/8/32 in FP32 and FP16 (and with CUDA graphs).

    python -m bench.network [--batches 1,8,32] [--out bench/results] [--compile]

On a machine without CUDA it measures the CPU (PyTorch) instead and says so. --compile adds, on CUDA, FP16 with
torch.compile (dynamic batch axis, as the fusion model's `torch_compile` parameter) under CUDA graphs; the first
call at each batch size compiles (printed as compile_s).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from pathlib import Path

import torch

from bench.run import machine_tag
from build.export_onnx import example_inputs
from facefuse.network import INPUT_NAMES, FusionNetwork, input_dtype


def _time(call, device: torch.device, seconds: float = 2.0) -> float:
    """Median-free steady-state rate: calls per second over `seconds` after a warm-up."""
    for _ in range(3):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def measure(batch: int, precision: str, device: torch.device, graphs: bool,
            compiled: torch.nn.Module | None = None) -> dict[str, float]:
    """One row; ``compiled``: a torch.compile'd FusionNetwork in ``precision`` to run instead of a fresh one."""
    dtype = torch.float16 if precision == "fp16" else torch.float32
    network = compiled if compiled is not None else FusionNetwork().eval().to(device, dtype)
    inputs = [tensor.to(device, input_dtype(name, dtype))
              for name, tensor in zip(INPUT_NAMES, example_inputs(batch, seed=batch))]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        started = time.perf_counter()
        network(*inputs)  # with torch.compile: compiles for this batch size
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_call_s = time.perf_counter() - started
        if graphs:
            static_inputs = [tensor.clone() for tensor in inputs]
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                for _ in range(3):
                    network(*static_inputs)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                network(*static_inputs)
            rate = _time(graph.replay, device)
        else:
            rate = _time(lambda: network(*inputs), device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"batch": batch, "precision": precision, "cuda_graphs": graphs, "compiled": compiled is not None,
            "compile_s": first_call_s if compiled is not None else 0.0, "calls_per_s": rate,
            "faces_per_s": rate * batch, "ms_per_call": 1000.0 / rate, "peak_memory_mib": peak}


def _report(row: dict[str, float]) -> None:
    compiled = f" compiled (first call {row['compile_s']:.0f} s)" if row["compiled"] else ""
    print(f"[network] batch {row['batch']:3d} {row['precision']} graphs={row['cuda_graphs']!s:5}{compiled}: "
          f"{row['faces_per_s']:10.0f} faces/s  {row['ms_per_call']:8.2f} ms/call  "
          f"peak {row['peak_memory_mib']:8.1f} MiB", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--compile", action="store_true", help="add FP16 rows with torch.compile (CUDA only)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("[network] no CUDA device: measuring FP32 on the CPU only", flush=True)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for precision in ("fp32", "fp16") if device.type == "cuda" else ("fp32",):
            for graphs in (False, True) if device.type == "cuda" else (False,):
                row = measure(batch, precision, device, graphs)
                rows.append(row)
                _report(row)
    if args.compile and device.type == "cuda":
        compiled = torch.compile(FusionNetwork().eval().to(device, torch.float16), dynamic=True)
        for batch in (int(b) for b in args.batches.split(",")):
            row = measure(batch, "fp16", device, True, compiled)
            rows.append(row)
            _report(row)
    elif args.compile:
        print("[network] --compile: no CUDA device, not measured", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{datetime.date.today().isoformat()}_{machine_tag()}_network.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"[network] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where one request's preprocess and postprocess time goes on the GPU path: wall time per call, every host wait
with its source line (CUDA's sync debug mode), and torch.profiler's GPU time and kernel launches.

    python -m bench.profile_request [--device cuda] [--repeats 10] [--rows 1,8] [--tables] [--by-operator]
                                    [--by-kernel] [--python-profile] [--compile-nets]

On an H100 (2026-12-06, bench/results/2026-12-06_H100_request_profile.txt) one request's preprocess took 12 to 21 ms
for 4.4 ms of GPU work in 366 launches with 33 host waits, a postprocess row 14 ms for 1.7 ms in 171 launches with
14 waits: the host side is the cost. On a CPU device the waits are not counted (CUDA only).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import io
import itertools
import pstats
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator

import torch

from bench.inputs import benchmark_pairs
from facefuse.detection import FaceDetector
from facefuse.face_mesh import FaceMesh
from facefuse.pipeline import SERVICE_DETECTOR_MAX_SIDE, FusionRequest, Preprocessor
from facefuse.postprocess_torch import benchmark_rows, finish_torch_batch

_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``call`` in ms over ``repeats`` calls, the device's queue drained before and after each:
    a mean let one stalled call of eight (100 ms and more, H100) decide a comparison."""
    times = []
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        call()
        _synchronize(device)
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def host_waits(call: Callable[[], object]) -> collections.Counter:
    """Each place in our code where ``call`` made the host wait for the GPU (a copy to or from pageable memory, an
    ``.item()``, a synchronize), three frames deep, with its count."""
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings' hook
        ours = [frame for frame in traceback.extract_stack()[:-1]
                if "/facefuse/" in frame.filename or "/bench/" in frame.filename]
        sites[" < ".join(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}({frame.name})"
                         for frame in ours[::-1][:3]) or "(outside our code)"] += 1

    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = shown
    return sites


def gpu_work(call: Callable[[], object], device: torch.device,
             record_shapes: bool = False) -> tuple[float, int, torch.profiler.profile]:
    """(ms of kernels and copies on the GPU, kernel launches, the profiler) for one ``call``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=record_shapes) as profiler:
        call()
        _synchronize(device)
    averages = profiler.key_averages()
    # The device's own events (kernels, copies) only: an operator's row repeats its kernels' time.
    gpu_ms = sum(event.self_device_time_total for event in averages
                 if event.device_type == torch.autograd.DeviceType.CUDA) / 1000.0
    launches = sum(event.count for event in averages if event.key in _LAUNCHES)
    return gpu_ms, launches, profiler


def _own_ms(event: object, device: torch.device) -> float:
    """An event's own time in ms: on the GPU for a CUDA device, else on the CPU."""
    return (event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total) / 1000.0


def by_operator(profiler: torch.profiler.profile, device: torch.device,
                top: int = 15) -> list[tuple[str, str, float, int]]:
    """(operator, input shapes, ms, calls), largest first: the operators' own time on the GPU (on a CPU device, on
    the CPU), grouped by input shape, which tells which tensors cost it (e.g. a full-resolution batch made
    contiguous). The shapes, not source lines: torch 2.11 on the H100 did not link operators to Python frames."""
    rows = [(event.key, str(event.input_shapes), _own_ms(event, device), event.count)
            for event in profiler.key_averages(group_by_input_shape=True)
            if event.device_type == torch.autograd.DeviceType.CPU and event.key.startswith("aten::")
            and _own_ms(event, device)]
    return sorted(rows, key=lambda row: -row[2])[:top]


def by_kernel(profiler: torch.profiler.profile, device: torch.device, top: int = 15) -> list[tuple[str, float, int]]:
    """(kernel or copy, ms, count), largest first: everything the GPU ran by name, also what no operator launched and
    ``by_operator`` therefore misses (the fused jiterator kernels, nvJPEG's, a replayed CUDA graph's). On a CPU
    device: the CPU events by own time."""
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU

    rows = [(event.key, _own_ms(event, device), event.count) for event in profiler.key_averages()
            if event.device_type == kind and _own_ms(event, device)]
    return sorted(rows, key=lambda row: -row[1])[:top]


def python_profile(call: Callable[[], object], device: torch.device, repeats: int, top: int = 25) -> str:
    """cProfile's table of ``call`` over ``repeats`` calls, by own time: where the host's time goes (Python, the
    torch operators' dispatch, waits) when the GPU's own time is a fraction of the wall time."""
    profiler = cProfile.Profile()
    _synchronize(device)
    profiler.enable()
    for _ in range(repeats):
        call()
    _synchronize(device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def stage_ms(results: list) -> dict[str, float]:
    """Mean ms per row of each stage the pipeline timed (metadata "timings_ms"), over the rows that succeeded."""
    totals: collections.Counter = collections.Counter()
    rows = 0
    for result in results:
        metadata = getattr(result, "metadata", None)
        if metadata is None and isinstance(result, tuple):
            metadata = result[1]
        if not isinstance(metadata, dict):
            continue
        rows += 1
        for stage, ms in metadata.get("timings_ms", {}).items():
            totals[stage] += ms
    return {stage: round(ms / max(1, rows), 2) for stage, ms in totals.items()}


def median_stage_ms(call: Callable[[], list], calls: int = 3) -> dict[str, float]:
    """``stage_ms`` of ``calls`` calls, each stage's median: one call's stages can carry a one-off stall (an 8-row
    batch once showed 22 ms per row of alignment inside a 41 ms batch)."""
    return median_stages([stage_ms(call()) for _ in range(calls)])


def median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's median over ``runs`` (``stage_ms`` results; the first run's stages, each over the runs that
    have it)."""
    return {stage: round(statistics.median(run[stage] for run in runs if stage in run), 2) for stage in runs[0]}


def served_preprocessor(device: torch.device, compile_nets: bool = False) -> Preprocessor:
    """The Preprocessor as the preprocess model builds it by default: BlazeFace proposals, the detector's working
    size, the mesh on the same device, and targets and crops kept in GPU memory for fusion and postprocess
    (``outputs_on_gpu`` "auto")."""
    return Preprocessor(FaceDetector(device=device, max_side=SERVICE_DETECTOR_MAX_SIDE, proposals="auto",
                                     compile_nets=compile_nets),
                        FaceMesh(device=device, compile_net=compile_nets), outputs_on_device=True)


def _next_batch(prepare: Callable[[list], list], batches: Iterator[list]) -> list:
    return prepare(next(batches))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rows", default="1", help="rows per batch, comma-separated (1,8: how each stage scales "
                                                    "with the batch Triton's dynamic batcher forms)")
    parser.add_argument("--tables", action="store_true", help="also print torch.profiler's tables")
    parser.add_argument("--by-operator", action="store_true",
                        help="each operator's own time by input shape (GPU time on a GPU)")
    parser.add_argument("--by-kernel", action="store_true",
                        help="everything the GPU ran by kernel name, also kernels no operator launched (fused, "
                             "nvJPEG, CUDA graphs)")
    parser.add_argument("--python-profile", action="store_true",
                        help="also print cProfile's functions by own time (the host side of each call)")
    parser.add_argument("--compile-nets", action="store_true",
                        help="BlazeFace and the mesh through torch.compile in their CUDA graphs (preprocess "
                             "parameter compile_nets = yes); prints the warm-up's time")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch_sizes = [int(value) for value in args.rows.split(",")]
    pairs = benchmark_pairs(max(4, 2 * max(batch_sizes)))
    preprocessor = served_preprocessor(device, args.compile_nets)
    started = time.perf_counter()
    preprocessor.warm_up()
    print(f"[request] preprocess warm-up {time.perf_counter() - started:.1f} s"
          f"{' (nets compiled)' if args.compile_nets else ''}", flush=True)
    requests = [FusionRequest(*pair, 100.0, 100.0, b"{}") for pair in pairs]
    for request in requests:  # every pair seen once: decode and detector sizes warmed up
        preprocessor.prepare_batch([request])
    for count in batch_sizes:
        # Two different batches of distinct pairs, alternated: identical images in a batch are decoded once.
        batches = [requests[:count], requests[count:2 * count]]
        preprocessor.prepare_batch(batches[0])
        # Built once: served, the targets arrive in GPU memory from preprocess (DLPack), so their upload is not
        # postprocess's work (the paste writes into a copy).
        finish_rows = benchmark_rows(count, device)
        finish_torch_batch(finish_rows)
        rows_label = "1 row" if count == 1 else f"{count} rows"
        work = {f"preprocess {rows_label}": functools.partial(_next_batch, preprocessor.prepare_batch,
                                                                   itertools.cycle(batches)),
                f"postprocess {rows_label}": functools.partial(finish_torch_batch, finish_rows)}
        for label, call in work.items():
            per_batch = wall_ms(call, device, args.repeats)
            print(f"[request] {label}: {per_batch:.2f} ms wall (median of {args.repeats}), {per_batch / count:.2f} ms "
                  f"per row; stages per row (median of 3 calls) {median_stage_ms(call)}", flush=True)
            if device.type == "cuda":
                # What one instance's process holds at this batch size: 12 instances filled an 80 GB H100.
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                call()
                print(f"[request]   peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB "
                      f"allocated, {torch.cuda.max_memory_reserved(device) / 2**20:.0f} MiB reserved", flush=True)
                sites = host_waits(call)
                print(f"[request]   {sum(sites.values())} host waits")
                for site, count_at_site in sites.most_common(20):
                    print(f"[request]     {count_at_site:3d}  {site}")
            gpu_ms, launches, profiler = gpu_work(call, device, record_shapes=args.by_operator)
            print(f"[request]   GPU kernels and copies {gpu_ms:.2f} ms; {launches} kernel launches", flush=True)
            if args.by_operator:
                for name, shapes, ms, calls in by_operator(profiler, device):
                    print(f"[request]     {device.type.upper()} {ms:6.3f} ms {calls:4d} calls  {name} {shapes[:110]}")
            if args.by_kernel:
                for name, ms, count in by_kernel(profiler, device):
                    print(f"[request]     kernel {ms:6.3f} ms {count:4d}x  {name[:120]}")
            if args.python_profile:
                table = python_profile(call, device, args.repeats)
                print("\n".join(f"[request]   py {line}" for line in table.splitlines() if line.strip()))
            if args.tables:
                sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
                print(profiler.key_averages().table(sort_by=sort_by, row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())

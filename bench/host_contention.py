"""Preprocess outside Triton with N processes at once: where a served batch's doubled host time comes from.

Served on an H100 (6 + 6 instances under MPS, c=128, session 18) a preprocess batch cost ~5.9 ms of host time per row;
bench.profile_request, one process alone, ~2.8 ms. This probe runs the served Preprocessor in N worker processes
that start together and batch the bench's 1080p pairs for the same seconds, so the candidates separate, one run
each: the process settings of a model instance (``--env served``: process_env.set_process_defaults,
keep_freed_memory, freeze_heap; ``plain``: as profile_request), other processes sharing the host and GPU
(N = 1 vs 6), and an MPS daemon (started by the caller; ``--label`` names the setting). What stays after all three
is Triton's own (its stub, the tensors' hand-over).

    python -m bench.host_contention [--processes 1,6] [--rows 8] [--seconds 8] [--env served|plain]
                                    [--device cuda] [--stage preprocess|decode] [--label TEXT] [--csv FILE]

Per process count it prints each row's wall and CPU time (process time; CUDA's spinning waits count as CPU), the
median over workers, all workers' rows/s together and the stages per row (the pipeline's own timings).
``--stage decode`` runs only the batch's photo decode (``decode_on_device``, one batched nvJPEG call on a GPU, whose
hardware decoder all processes share): whether the decoder's own throughput caps the service (two photos a row).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

READY = "ready"


def _worker(rows: int, seconds: float, env: str, device_name: str, stage: str = "preprocess") -> dict:
    """One process: build and warm the served Preprocessor (``stage`` "preprocess") or the batched decoder alone
    ("decode": the 2 x ``rows`` photos of a batch in one ``decode_on_device`` call), say ``READY``, wait for a line on
    stdin, then batch for ``seconds``. Imports here, after the process settings (they must precede torch)."""
    if env == "served":
        from facefuse.process_env import set_process_defaults

        set_process_defaults()
    import torch

    from bench.inputs import benchmark_pairs
    from bench.profile_request import median_stages, served_preprocessor, stage_ms
    from facefuse.hostmem import freeze_heap, keep_freed_memory
    from facefuse.pipeline import FusionRequest

    if env == "served":
        keep_freed_memory()
    device = torch.device(device_name)
    requests = [FusionRequest(*pair, 100.0, 100.0, b"{}") for pair in benchmark_pairs(2 * rows)]
    # Two batches of distinct pairs, alternated: identical images in one batch are decoded once.
    batches = [requests[:rows], requests[rows:]]
    if stage == "decode":
        from facefuse.device_imaging import decode_on_device
        from facefuse.imaging import ImageLimits

        prepare = functools.partial(_decode_batch, device=device, decode=decode_on_device, limits=ImageLimits())
    else:
        preprocessor = served_preprocessor(device)
        preprocessor.warm_up()
        prepare = preprocessor.prepare_batch
    for batch in batches:
        prepare(batch)
    if env == "served":
        freeze_heap()
    print(READY, flush=True)
    sys.stdin.readline()
    walls, cpus, stages = [], [], []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started, cpu_started = time.perf_counter(), time.process_time()
        results = prepare(batches[len(walls) % 2])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append((time.perf_counter() - started) * 1000.0 / rows)
        cpus.append((time.process_time() - cpu_started) * 1000.0 / rows)
        stages.append(stage_ms(results))
    return {"batches": len(walls), "wall_ms_per_row": statistics.median(walls),
            "cpu_ms_per_row": statistics.median(cpus), "rows_per_s": len(walls) * rows / seconds,
            "stages_ms_per_row": median_stages(stages)}


def _decode_batch(requests: list, device: Any, decode: Callable, limits: Any) -> list[tuple[None, dict]]:
    """The batch's photos decoded as preprocess decodes them (``decode``: facefuse.device_imaging.decode_on_device,
    one batched call; the GPU's queue drained after it); per request, its metadata as ``stage_ms`` reads it: the
    decode's ms per row. (The worker imports, after its process settings, and binds ``decode`` and ``limits``.)"""
    started = time.perf_counter()
    items = [(data, role) for request in requests
             for data, role in ((request.source_image, "source"), (request.target_image, "target"))]
    decoded = decode(items, limits, device)
    failed = [result for result in decoded if isinstance(result, Exception)]  # FusionError is one
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(items)} photos did not decode: {failed[0]}")
    if device.type == "cuda":
        import torch  # already imported by the worker: a lookup

        torch.cuda.synchronize(device)
    per_row = (time.perf_counter() - started) * 1000.0 / len(requests)
    return [(None, {"timings_ms": {"decode": per_row}}) for _ in requests]


def run_together(count: int, rows: int, seconds: float, env: str, device: str,
                 startup_s: float = 300.0, stage: str = "preprocess") -> list[dict]:
    """``count`` workers, started together once every one is warm (each gets ``startup_s`` to get there); each
    worker's result."""
    command = [sys.executable, "-m", "bench.host_contention", "--worker", "--rows", str(rows), "--seconds",
               str(seconds), "--env", env, "--device", device, "--stage", stage]
    workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[1]) for _ in range(count)]
    try:
        for index, worker in enumerate(workers):
            # A worker that hangs while loading (a GPU that never answers) must not hang the probe.
            waited = select.select([worker.stdout], [], [], startup_s)[0]
            line = worker.stdout.readline().strip() if waited else "(nothing within the start-up limit)"
            if line != READY:
                raise RuntimeError(f"worker {index + 1} of {count} did not get ready (exit code {worker.poll()}, "
                                   f"said {line!r}); its errors are above")
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = []
        for index, worker in enumerate(workers):
            output, _ = worker.communicate(timeout=seconds + 120)
            if worker.returncode != 0:
                raise RuntimeError(f"worker {index + 1} of {count} failed (exit code {worker.returncode})")
            results.append(json.loads(output.strip().splitlines()[-1]))
        return results
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def summary(count: int, results: list[dict]) -> dict:
    """The median worker's wall and CPU per row, every worker's rows/s added up, the median worker's stages."""
    stages = {stage: round(statistics.median(result["stages_ms_per_row"].get(stage, 0.0) for result in results), 2)
              for stage in results[0]["stages_ms_per_row"]}
    return {"processes": count, "batches": sum(result["batches"] for result in results),
            "wall_ms_per_row": round(statistics.median(result["wall_ms_per_row"] for result in results), 2),
            "cpu_ms_per_row": round(statistics.median(result["cpu_ms_per_row"] for result in results), 2),
            "rows_per_s": round(sum(result["rows_per_s"] for result in results), 1), "stages_ms_per_row": stages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,6", help="process counts, comma-separated, each run in turn")
    parser.add_argument("--rows", type=int, default=8, help="rows per batch (8: a served batch at c=128)")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long every worker batches")
    parser.add_argument("--env", choices=("served", "plain"), default="served",
                        help="served: a model instance's process settings; plain: as bench.profile_request")
    parser.add_argument("--device", default=None, help="cuda where there is a GPU, else cpu")
    parser.add_argument("--stage", choices=("preprocess", "decode"), default="preprocess",
                        help="preprocess: the whole served Preprocessor; decode: the batch's photos decoded alone "
                             "(nvJPEG on a GPU: whether its decoder is shared by the processes)")
    parser.add_argument("--label", default="", help="names the run's setting in the output (e.g. 'MPS')")
    parser.add_argument("--csv", type=Path, help="append one row per process count to this CSV")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(_worker(args.rows, args.seconds, args.env, args.device, args.stage)), flush=True)
        return 0
    label = (f"{args.env} env, {args.device}" + ("" if args.stage == "preprocess" else f", {args.stage} alone")
             + (f", {args.label}" if args.label else ""))
    for count in (int(value) for value in args.processes.split(",")):
        started = time.perf_counter()
        row = summary(count, run_together(count, args.rows, args.seconds, args.env, args.device,
                                          stage=args.stage))
        print(f"[contention] {count} process{'es' if count > 1 else ''} ({label}), {args.rows} rows a batch: "
              f"{row['wall_ms_per_row']:.2f} ms wall, {row['cpu_ms_per_row']:.2f} ms CPU per row (median worker); "
              f"{row['rows_per_s']:.1f} rows/s together; stages per row {row['stages_ms_per_row']} "
              f"({time.perf_counter() - started:.0f} s with start-up)", flush=True)
        if args.csv:
            new = not args.csv.exists()
            with args.csv.open("a", newline="") as handle:
                writer = csv.writer(handle)
                if new:
                    writer.writerow(["label", "env", "device", "processes", "rows", "batches", "wall_ms_per_row",
                                     "cpu_ms_per_row", "rows_per_s", "stages_ms_per_row", "stage"])
                writer.writerow([args.label, args.env, args.device, count, args.rows, row["batches"],
                                 row["wall_ms_per_row"], row["cpu_ms_per_row"], row["rows_per_s"],
                                 json.dumps(row["stages_ms_per_row"]), args.stage])
    return 0


if __name__ == "__main__":
    sys.exit(main())

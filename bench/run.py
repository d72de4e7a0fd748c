"""`make bench`: perf_analyzer against the face_fusion ensemble and each composing model on the real local Triton
server, with 1080p JPEG inputs; a concurrency sweep; the classic landmark-morph baseline on the same images in the
same run; CSV, a PNG plot and a markdown summary under bench/results/.

    python -m bench.run [--concurrency 1,2,4] [--measurement-ms 4000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.execute_report import report as execute_report
from bench.gpu_monitor import GpuSampler
from bench.inputs import benchmark_pair, benchmark_pairs, write_input_data, write_tensor_data
from bench.repository import (
    parse_assignments,
    parse_parameters,
    served_configs,
    served_settings,
    tuned_repository,
)
from bench.stub_profile import StubProfiler, find_py_spy
from facefuse.execute_log import ENVIRONMENT_VARIABLE as EXECUTE_LOG_VARIABLE
from facefuse.execute_log import read_records
from facefuse.local_server import (
    MODEL_REPOSITORY,
    REPO_ROOT,
    Ports,
    cuda_pool_args,
    free_ports,
    pytriton_root,
    sigterm_as_interrupt,
    start,
    stop_process,
)
from facefuse.mps import SERVER as MPS_SERVER
from facefuse.mps import mps_problem, start_mps
from facefuse.procfs import (
    cpu_seconds,
    machine_cpu_seconds,
    processes_named,
    stub_processes,
    thread_cpu_by_id,
    thread_cpu_seconds,
)

PERF_LIBS = REPO_ROOT / ".cache" / "perf_analyzer_libs"
BUSIEST_THREADS = 4  # single threads of the server (and MPS server) named per level


def perf_analyzer_command() -> tuple[list[str], dict[str, str]]:
    """The perf_analyzer binary of the tritonclient 2.51.0 wheel, with the two libraries it lacks here (libb64,
    libcudart) taken from the pytriton wheel's bundled copies (FACTS.md)."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.exists() and shutil.which("perf_analyzer"):
        binary = Path(shutil.which("perf_analyzer"))
    if not binary.exists():
        raise RuntimeError(f"{binary} not found: tritonclient==2.51.0 (manylinux1 wheel) carries it; run make venv")
    bundled = pytriton_root().parent / "nvidia_pytriton.libs"
    PERF_LIBS.mkdir(parents=True, exist_ok=True)
    for pattern, soname in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        link = PERF_LIBS / soname
        if not link.exists():
            link.symlink_to(next(bundled.glob(pattern)))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(PERF_LIBS), str(bundled), env.get("LD_LIBRARY_PATH", "")])
    return [str(binary)], env


def machine_tag() -> str:
    gpu = ""
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True)
        names = [line.strip() for line in query.stdout.splitlines() if line.strip()]
        if names:
            gpu = f"{len(names)}x{names[0].replace('NVIDIA ', '').replace(' ', '')}"
    return gpu or f"cpu{os.cpu_count()}"


class PerfAnalyzerFailed(RuntimeError):
    """perf_analyzer got no measurement; ``output``: its whole console text (every pass), for the record."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def run_perf(model: str, input_data: Path, concurrency: int, ports: Ports, measurement_ms: int,
             out_csv: Path, protocol: str = "grpc", stability: int = 25,
             warmup_requests: int = 0) -> tuple[dict[str, float], str]:
    """One perf_analyzer measurement (after ``warmup_requests`` unmeasured requests at the same concurrency);
    returns throughput and latency percentiles (ms) plus the console text."""
    command, env = perf_analyzer_command()
    url = f"localhost:{ports.grpc if protocol == 'grpc' else ports.http}"
    command += ["-m", model, "-i", protocol, "-u", url, "--input-data", str(input_data),
                "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(measurement_ms),
                "--stability-percentage", str(stability), "--max-trials", "6", "-f", str(out_csv), "--verbose-csv"]
    if warmup_requests:
        # A new load level first costs one-off work in the server (CUDA graphs and allocator pools for new batch
        # sizes, shared memory growth: seconds of stall in the first window on the H200). Measure the steady state:
        # a throwaway run at the same concurrency first, whatever it reports.
        subprocess.run(command[:command.index("-f")] + ["--measurement-mode", "count_windows",
                                                        "--measurement-request-count", str(warmup_requests),
                                                        "--max-trials", "1"],
                       capture_output=True, text=True, env=env)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    measurement = f"{measurement_ms} ms windows, stability {stability}%"
    wide = max(100, 2 * stability)
    if result.returncode != 0 and _unstable(result):
        # Python-backend throughput wobbles (more so with several instances and GPU batches); accept a wider band
        # (the figures are still the mean of the last three windows) rather than report nothing.
        command[command.index("--stability-percentage") + 1] = str(wide)
        command[command.index("--max-trials") + 1] = "10"
        measurement = f"{measurement_ms} ms windows, stability {wide}%"
        result = subprocess.run(command + ["-v"], capture_output=True, text=True, env=env)  # -v: every pass
    if result.returncode != 0 and _unstable(result):
        # Still unstable: batches of a slow model make short time windows lumpy. Windows of a fixed number of
        # requests (several batches each) average that out.
        requests = max(64, 8 * concurrency)
        measurement = f"{requests}-request windows, stability {wide}%"
        result = subprocess.run(command + ["-v", "--measurement-mode", "count_windows",
                                           "--measurement-request-count", str(requests)],
                                capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise PerfAnalyzerFailed(f"perf_analyzer failed for {model} at concurrency {concurrency}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-2000:]}",
                                 output=result.stdout + result.stderr)
    if warmup_requests:
        measurement += f", after {warmup_requests} warm-up requests"
    with open(out_csv) as handle:
        row = next(csv.DictReader(handle))
    figures = {
        "concurrency": concurrency,
        "throughput_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000.0,
        "p90_ms": float(row["p90 latency"]) / 1000.0,
        "p99_ms": float(row["p99 latency"]) / 1000.0,
        "measurement": measurement,
    }
    return figures, result.stdout


def cpu_snapshot(server_pid: int) -> dict[str, Any]:
    """CPU seconds used so far by the server process, by each model's stubs together (and by their threads, grouped
    by name: ``threads``), by finished children of this process (perf_analyzer runs), and by the whole machine (busy
    and total), with a monotonic clock."""
    snapshot: dict[str, Any] = {"server": cpu_seconds(server_pid) or 0.0, "threads": {}}
    # Single threads of the processes every request goes through (Triton's own, and a CUDA MPS server where one
    # runs): one saturated thread caps the service however many instances serve.
    snapshot["single_threads"] = {f"server/{tid}": value for tid, value in thread_cpu_by_id(server_pid).items()}
    for mps_pid in processes_named(MPS_SERVER):
        snapshot["mps_server"] = snapshot.get("mps_server", 0.0) + (cpu_seconds(mps_pid) or 0.0)
        snapshot["single_threads"].update({f"mps-server/{tid}": value
                                           for tid, value in thread_cpu_by_id(mps_pid).items()})
    for stub in stub_processes(server_pid).values():
        snapshot[stub.model] = snapshot.get(stub.model, 0.0) + (cpu_seconds(stub.pid) or 0.0)
        by_name = snapshot["threads"].setdefault(stub.model, {})
        for name, seconds in thread_cpu_seconds(stub.pid).items():
            by_name[name] = by_name.get(name, 0.0) + seconds
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    snapshot["perf_analyzer"] = children.ru_utime + children.ru_stime
    snapshot["machine_busy"], snapshot["machine_total"] = machine_cpu_seconds()
    snapshot["clock"] = time.monotonic()
    return snapshot


def cpu_cores(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Cores each part kept busy on average between two snapshots (``cpu_<part>_cores``), the machine's busy
    cores against all of them (``cpu_machine_busy_cores``, ``cpu_machine_cores``), and per model the thread groups
    that kept at least 0.05 cores busy, busiest first (``cpu_threads``, e.g. "postprocess: main 0.41, ...")."""
    elapsed = max(after["clock"] - before["clock"], 1e-9)
    machine_elapsed = max(after["machine_total"] - before["machine_total"], 1e-9)
    cores: dict[str, Any] = {f"cpu_{part}_cores": round((after[part] - before.get(part, 0.0)) / elapsed, 2)
                             for part in after if part not in ("clock", "machine_busy", "machine_total", "threads",
                                                               "single_threads")}
    by_model = []
    for model, threads in sorted(after.get("threads", {}).items()):
        earlier = before.get("threads", {}).get(model, {})
        busy = sorted(((seconds - earlier.get(name, 0.0)) / elapsed, name) for name, seconds in threads.items())
        parts = [f"{name} {value:.2f}" for value, name in reversed(busy) if value >= 0.05]
        by_model.append(f"{model}: {', '.join(parts) or '-'}")
    cores["cpu_threads"] = "; ".join(by_model)
    earlier_singles = before.get("single_threads", {})
    singles = sorted(((seconds - earlier_singles.get(key, (name, 0.0))[1]) / elapsed, key, name)
                     for key, (name, seconds) in after.get("single_threads", {}).items())
    cores["cpu_busiest_threads"] = ", ".join(f"{key.split('/')[0]} {name} {value:.2f}"
                                             for value, key, name in reversed(singles[-BUSIEST_THREADS:])
                                             if value >= 0.05)
    cores["cpu_machine_cores"] = os.cpu_count() or 1
    cores["cpu_machine_busy_cores"] = round((after["machine_busy"] - before["machine_busy"]) / machine_elapsed
                                            * cores["cpu_machine_cores"], 2)
    return cores


def error_lines(error: Exception) -> list[str]:
    """The error's message as its non-blank lines (perf_analyzer's failures span many)."""
    return [line for line in str(error).splitlines() if line.strip()]


def record_failure(out: Path, tag: str, model: str, concurrency: int, error: Exception) -> dict[str, Any]:
    """Keep why a level got no measurement beside the results (``<tag>_<model>_c<N>_failed.txt``: perf_analyzer's
    whole output where the error carries it, else the error), so that an archive of the results folder says why a
    level is missing; returns the summary's entry for it."""
    path = out / f"{tag}_{model}_c{concurrency}_failed.txt"
    path.write_text(f"{error}\n\n{getattr(error, 'output', '')}".rstrip() + "\n")
    lines = error_lines(error)
    return {"model": model, "concurrency": concurrency, "reason": lines[0] if lines else type(error).__name__,
            "file": path.name}


def write_rows(rows: list[dict], path: Path) -> None:
    """The measured rows as CSV (model and concurrency first), replacing the file."""
    columns = sorted({key for row in rows for key in row}, key=lambda k: (k != "model", k != "concurrency", k))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _unstable(result: subprocess.CompletedProcess) -> bool:
    # perf_analyzer prints "Failed to obtain stable measurement" on stderr (2.51), not stdout.
    return "stable measurement" in result.stdout + result.stderr


def composing_breakdown(console: str) -> dict[str, float]:
    """Per composing model, from perf_analyzer's ensemble report: average compute and queue time per request (ms),
    Triton's compute input and output (ms: moving a batch's tensors into and out of the model, for a Python model
    through its stub; at c=128 on an H100 they took preprocess 2.7 + 4.1 ms, session 19) and the average batch the
    model executed."""
    blocks: dict[str, str] = {}
    name = None
    for line in console.splitlines():
        header = re.match(r"\s*(\w+), version: \d+\s*$", line)  # "  preprocess, version: 1"
        if header:
            name = header.group(1)
            blocks[name] = ""
        elif name is not None:
            blocks[name] += line + "\n"
    breakdown = {}
    for name, block in blocks.items():
        compute = re.search(r"compute infer (\d+) usec", block, re.IGNORECASE)
        queue = re.search(r"queue (\d+) usec", block, re.IGNORECASE)
        executions = re.search(r"Execution count: (\d+)", block)
        requests = re.search(r"Inference count: (\d+)", block)
        if compute:
            breakdown[f"{name}_infer_ms"] = int(compute.group(1)) / 1000.0
            breakdown[f"{name}_queue_ms"] = int(queue.group(1)) / 1000.0 if queue else float("nan")
            for part in ("input", "output"):
                moved = re.search(rf"compute {part} (\d+) usec", block, re.IGNORECASE)
                if moved:
                    breakdown[f"{name}_{part}_ms"] = int(moved.group(1)) / 1000.0
        if executions and requests and int(executions.group(1)):
            breakdown[f"{name}_batch"] = round(int(requests.group(1)) / int(executions.group(1)), 2)
    return breakdown


def breakdown_line(figures: dict) -> str:
    """``composing_breakdown``'s figures as one line, per model: queue, Triton's input, compute, output (ms per
    request) and the average batch; empty where there are none."""
    models = [key.removesuffix("_infer_ms") for key in figures if key.endswith("_infer_ms")]
    return "; ".join(
        f"{model} queue {figures[f'{model}_queue_ms']:.1f}, in {figures.get(f'{model}_input_ms', float('nan')):.1f}, "
        f"compute {figures[f'{model}_infer_ms']:.1f}, out {figures.get(f'{model}_output_ms', float('nan')):.1f}"
        f" (batch {figures.get(f'{model}_batch', float('nan')):.1f})" for model in models)


def composing_inputs(source: bytes, target: bytes, folder: Path) -> dict[str, Path]:
    """Real intermediate tensors for fusion and postprocess, made by the same code in this process."""
    from facefuse.engine import LocalFusion, network_inputs
    from facefuse.network import OUTPUT_NAMES
    from facefuse.pipeline import FusionRequest
    from facefuse.triton_glue import bytes_tensor, json_bytes

    engine = LocalFusion(runtime="torch-cpu")
    prepared = engine.preprocessor.prepare_batch([FusionRequest(source, target, 100.0, 100.0, b"{}")])[0]
    inputs = network_inputs([prepared])
    outputs = engine.runtime.run(inputs)
    post = {name: outputs[name] for name in OUTPUT_NAMES}
    post["TARGET_RGB"] = prepared.target_rgb[None]
    post["TARGET_MATRIX"] = prepared.target_matrix[None].astype(np.float32)
    post["PRE_METADATA"] = bytes_tensor([json_bytes(prepared.metadata)])
    post["OPTIONS"] = bytes_tensor([b"{}"])
    return {"fusion": write_tensor_data(folder / "fusion.json", inputs),
            "postprocess": write_tensor_data(folder / "postprocess.json", post)}


def classic_baseline(source: bytes, target: bytes, repeats: int = 5) -> dict[str, float]:
    """The classic landmark morph end to end (decode, dlib detection, 68 points, Delaunay warp, dissolve,
    seamlessClone, JPEG encode), single process, on the same pair."""
    from evaluation.baseline import classic_fuse
    from evaluation.dlib_models import detect_faces
    from facefuse.imaging import decode_image, encode_image

    def once() -> None:
        source_rgb, target_rgb = decode_image(source), decode_image(target)
        source_faces, target_faces = detect_faces(source_rgb), detect_faces(target_rgb)
        largest = max(source_faces, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        target_box = max(target_faces, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        fused, _ = classic_fuse(source_rgb, target_rgb, 100.0, 100.0, largest, target_box)
        encode_image(fused, "jpeg", 92)

    once()  # warm-up: model loading
    started = time.perf_counter()
    for _ in range(repeats):
        once()
    seconds = (time.perf_counter() - started) / repeats
    return {"classic_images_per_s": 1.0 / seconds, "classic_ms_per_image": seconds * 1000.0}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
        axis.plot([r[key] for r in rows], [r["throughput_per_s"] for r in rows], style, label=key.split("_")[0])
    for row in rows:
        axis.annotate(f"c={row['concurrency']}", (row["p50_ms"], row["throughput_per_s"]), fontsize=8,
                      textcoords="offset points", xytext=(4, -10))
    axis.set_xlabel("latency (ms)")
    axis.set_ylabel("fused images / s")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,2,4", help="comma-separated concurrency levels")
    parser.add_argument("--measurement-ms", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--models", default="face_fusion,preprocess,fusion,postprocess")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--stability", type=int, default=25, help="perf_analyzer --stability-percentage")
    parser.add_argument("--warmup-requests", type=int, default=-1,
                        help="unmeasured requests at each concurrency before measuring it (default: 4 x concurrency, "
                             "at least 16; 0: none)")
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY,
                        help="serve this repository (e.g. a copy with other instance counts)")
    parser.add_argument("--distinct-pairs", type=int, default=32,
                        help="different 1080p (source, target) pairs sent in turn (>= the largest batch, so that no "
                             "batch holds the same image twice)")
    parser.add_argument("--instances", default="",
                        help="instance counts to measure, e.g. preprocess=4,postprocess=4 (serves a tuned copy); "
                             "`gpu`: the counts of the GPU configs (configs/gpu.pbtxt)")
    parser.add_argument("--queue-delay-us", default="",
                        help="max_queue_delay_microseconds, e.g. preprocess=4000 (default: config.pbtxt's on a CPU "
                             "host, the GPU configs' on a GPU host)")
    parser.add_argument("--cpu-threads", default="",
                        help="`cpu_threads` parameter per model, e.g. preprocess=1 (default as for the delays)")
    parser.add_argument("--max-batch", default="", help="max_batch_size per model, lower or higher, e.g. "
                                                        "preprocess=16 (the ensemble's follows the smallest)")
    parser.add_argument("--machine", default=None, help="tag for file names (default: GPU name or cpuN)")
    parser.add_argument("--parameter", action="append", default=[], metavar="MODEL.KEY=VALUE",
                        help="set an existing string parameter of a model's config, e.g. "
                             "preprocess.detector_max_side=1280 (serves a tuned copy; repeatable)")
    parser.add_argument("--profile-stubs", nargs="?", const="busy", default=None, choices=("busy", "wall"),
                        help="py-spy every model stub during each face_fusion level (bench.stub_profile): "
                             "<tag>_face_fusion_c<N>_stubs.txt; 'wall': idle samples inside execute too")
    parser.add_argument("--execute-log", action="store_true",
                        help="the stubs time every batch (facefuse/execute_log.py): one report per face_fusion level, "
                             "<tag>_face_fusion_c<N>_execute.txt (bench/execute_report.py)")
    parser.add_argument("--mps", action="store_true",
                        help="serve under a private CUDA MPS daemon (GPU hosts; facefuse/mps.py)")
    args = parser.parse_args(argv)
    if args.mps and mps_problem():
        print(f"[bench] --mps: {mps_problem()}", file=sys.stderr)
        return 2
    if args.profile_stubs and find_py_spy() is None:
        print("[bench] --profile-stubs: py-spy is not installed (requirements.txt pins it)", file=sys.stderr)
        return 2
    # On a GPU host the GPU configs' batching delays and threads, whatever counts are asked for (served_settings).
    instances, delays, threads = served_settings(args.instances, args.queue_delay_us, args.cpu_threads,
                                                 bool(cuda_pool_args()), args.model_repository)
    parameters = parse_parameters(args.parameter)
    max_batch = parse_assignments(args.max_batch)
    if instances or delays or threads or parameters or max_batch:
        args.model_repository = tuned_repository(REPO_ROOT / ".cache" / "bench" / "repository", instances, delays,
                                                 args.model_repository, threads, parameters, max_batch)
        print(f"[bench] serving a copy with instances {instances or 'as configured'}, queue delays (us) "
              f"{delays or 'as configured'}, cpu_threads {threads or 'as configured'}, parameters "
              f"{parameters or 'as configured'}, max batch {max_batch or 'as configured'}", flush=True)
    configs = served_configs(args.model_repository)
    print("[bench] served: " + "; ".join(f"{model} {', '.join(f'{key} {value}' for key, value in entry.items())}"
                                         for model, entry in configs.items()), flush=True)
    levels = [int(level) for level in args.concurrency.split(",")]
    tag = f"{datetime.date.today().isoformat()}_{args.machine or machine_tag()}"
    args.out.mkdir(parents=True, exist_ok=True)
    work = REPO_ROOT / ".cache" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    print(f"[bench] machine {tag}; building 1080p JPEG inputs", flush=True)
    source, target = benchmark_pair()
    pairs = benchmark_pairs(args.distinct_pairs)
    inputs = {"face_fusion": write_input_data(work / "ensemble.json", pairs, options={"target_face": 0}),
              "preprocess": work / "ensemble.json"}
    inputs.update(composing_inputs(source, target, work))
    ports = free_ports()
    mps = start_mps(REPO_ROOT / "out" / "mps") if args.mps else None  # MpsUnavailable says why it cannot
    environment = dict(mps.environment()) if mps else {}
    execute_folder = work / "execute_log"
    if args.execute_log:
        shutil.rmtree(execute_folder, ignore_errors=True)
        environment[EXECUTE_LOG_VARIABLE] = str(execute_folder)
    try:
        server = start(ports, REPO_ROOT / "out" / "bench-triton.log", model_repository=args.model_repository,
                       environment=environment or None)
    except BaseException:
        if mps:
            mps.stop()
        raise
    rows: list[dict] = []
    failures: list[dict] = []  # levels without a measurement, and why (summary's `failed`)
    try:
        for model in args.models.split(","):
            for level in levels:
                print(f"[bench] perf_analyzer {model} concurrency {level} ...", flush=True)
                # Samples the level's warm-up too: the same concurrency, the same work.
                profiler = (StubProfiler(server.pid, max(5.0, 3 * args.measurement_ms / 1000),
                                         work / "stub_profile" / f"c{level}", wall=args.profile_stubs == "wall")
                            if args.profile_stubs and model == "face_fusion" else None)
                try:
                    warmup = max(16, 4 * level) if args.warmup_requests < 0 else args.warmup_requests
                    before = cpu_snapshot(server.pid)
                    level_started = time.time()
                    gpu = GpuSampler().start()
                    try:
                        figures, console = run_perf(model, inputs[model], level, ports, args.measurement_ms,
                                                    work / f"{model}_{level}.csv", stability=args.stability,
                                                    warmup_requests=warmup)
                    finally:
                        gpu_figures = gpu.stop()
                    # The host's view of the level (its warm-up included): who keeps which cores busy, and the
                    # GPU's peak memory and busy share (GPU hosts).
                    figures.update(cpu_cores(before, cpu_snapshot(server.pid)))
                    figures.update(gpu_figures)
                except RuntimeError as error:
                    lines = error_lines(error)
                    print(f"[bench]   no measurement: {' | '.join(lines[:1] + lines[-4:])}", flush=True)
                    failures.append(record_failure(args.out, tag, model, level, error))
                    if profiler is not None:
                        profiler.finish()
                    continue
                if model == "face_fusion":
                    figures.update(composing_breakdown(console))
                    # perf_analyzer's own report (composing models' queue and compute times) beside the CSV.
                    (args.out / f"{tag}_face_fusion_c{level}_perf_analyzer.txt").write_text(console)
                if args.execute_log and model == "face_fusion":
                    # perf_analyzer reports its last three windows (stable by then): the batches of about that span
                    # (its warm-up and ramps would mix small batches of a half-loaded server in).
                    level_ended = time.time()
                    since = max(level_started, level_ended - 3 * args.measurement_ms / 1000.0 - 0.5)
                    report = execute_report(read_records(execute_folder, since, level_ended - 0.5),
                                            level_ended - 0.5 - since)
                    (args.out / f"{tag}_face_fusion_c{level}_execute.txt").write_text(report)
                    print("[bench]   execute: " + report.strip().replace("\n", "\n[bench]   "), flush=True)
                if profiler is not None:
                    report = profiler.finish()
                    report += "".join(f"\ncoverage: {line}" for line in profiler.coverage(figures))
                    (args.out / f"{tag}_face_fusion_c{level}_stubs.txt").write_text(report)
                    print("[bench]   py-spy: " + report.strip().replace("\n", "\n[bench]   "), flush=True)
                rows.append({"model": model, **figures})
                # Written after every level, so a run cut short (a time limit on a lent GPU) keeps what it measured.
                write_rows(rows, args.out / f"{tag}_perf.csv")
                print(f"[bench]   {figures['throughput_per_s']:.2f}/s  p50 {figures['p50_ms']:.1f} ms  "
                      f"p99 {figures['p99_ms']:.1f} ms", flush=True)
                if model == "face_fusion" and breakdown_line(figures):
                    print(f"[bench]   per request (ms): {breakdown_line(figures)}", flush=True)
                parts = ", ".join(f"{key[4:-6]} {value:.1f}" for key, value in figures.items()
                                  if key.startswith("cpu_") and key.endswith("_cores") and "machine" not in key)
                print(f"[bench]   cpu cores busy: {parts}; machine {figures['cpu_machine_busy_cores']:.1f} of "
                      f"{figures['cpu_machine_cores']}", flush=True)
                print(f"[bench]   by thread: {figures['cpu_threads']}", flush=True)
                print(f"[bench]   busiest single threads: {figures['cpu_busiest_threads'] or '-'}", flush=True)
                if gpu_figures:
                    print(f"[bench]   GPU: peak {gpu_figures['gpu_memory_peak_mib']:.0f} MiB in use, busy "
                          f"{gpu_figures['gpu_busy_percent']:.0f} % on average", flush=True)
    finally:
        stop_process(server)
        if mps:
            mps.stop()
    baseline = {} if args.skip_baseline else classic_baseline(source, target)
    csv_path = args.out / f"{tag}_perf.csv"
    write_rows(rows, csv_path)
    ensemble = [row for row in rows if row["model"] == "face_fusion"]
    plot(ensemble, args.out / f"{tag}_ensemble.png", f"face_fusion, 1080p JPEG, {tag}")
    summary = {"machine": tag, "python": platform.python_version(), "mps": args.mps, "instances": instances,
               "queue_delays_us": delays, "cpu_threads": threads, "parameters": parameters, "max_batch": max_batch,
               "served_configs": configs, "rows": rows, "failed": failures, **baseline}
    if baseline and ensemble:
        best = max(ensemble, key=lambda row: row["throughput_per_s"])
        summary["ratio_vs_classic"] = best["throughput_per_s"] / baseline["classic_images_per_s"]
        print(f"[bench] classic baseline {baseline['classic_images_per_s']:.2f} images/s "
              f"({baseline['classic_ms_per_image']:.0f} ms each, one process); face_fusion best "
              f"{best['throughput_per_s']:.2f}/s at concurrency {best['concurrency']}: "
              f"{summary['ratio_vs_classic']:.2f}x", flush=True)
    (args.out / f"{tag}_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[bench] wrote {csv_path}, {args.out / f'{tag}_ensemble.png'}, {args.out / f'{tag}_summary.json'}")
    return 0


if __name__ == "__main__":
    with sigterm_as_interrupt():  # a time limit's SIGTERM still stops the server and the MPS daemon (main's finally)
        sys.exit(main())

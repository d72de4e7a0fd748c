"""Where latency stalls come from: load `face_fusion` with perf_analyzer at one concurrency while polling Triton's
per-model statistics every --interval seconds, then write a timeline (CSV: per interval and model, executions,
rows, and the queue / compute time they spent) and print the spans in which the ensemble completed nothing.

    python -m bench.stall_probe [--concurrency 128] [--seconds 40] [--interval 0.5] [--out bench/results]

A stall then shows which model stopped executing while requests queued for it. On a GPU host run it beside
`nvidia-smi dmon` for the GPU's view of the same seconds.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from bench.inputs import benchmark_pairs, write_input_data
from bench.run import machine_tag, perf_analyzer_command
from facefuse.local_server import MODEL_REPOSITORY, REPO_ROOT, free_ports, start, stop_process

MODELS = ("face_fusion", "preprocess", "fusion", "postprocess")
_FIELDS = ("queue", "compute_input", "compute_infer", "compute_output")


def cumulative(stats: dict) -> dict[str, dict[str, float]]:
    """Triton's /v2/models/stats reply -> per model: executions, inferences (rows) and the cumulative ms of each
    phase in `_FIELDS` (the latest version of each model)."""
    totals: dict[str, dict[str, float]] = {}
    for entry in stats.get("model_stats", []):
        inference = entry.get("inference_stats", {})
        totals[entry["name"]] = {
            "executions": float(entry.get("execution_count", 0)),
            "rows": float(entry.get("inference_count", 0)),
            **{f"{field}_ms": float(inference.get(field, {}).get("ns", 0)) / 1e6 for field in _FIELDS},
        }
    return totals


def deltas(samples: list[tuple[float, dict[str, dict[str, float]]]]) -> list[dict[str, float | str]]:
    """Consecutive cumulative samples -> one row per interval and model with the increments (seconds from the first
    sample in `t`)."""
    rows: list[dict[str, float | str]] = []
    start = samples[0][0] if samples else 0.0
    for (_, before), (now, after) in zip(samples, samples[1:]):
        for model in sorted(after):
            if model not in before:
                continue
            row: dict[str, float | str] = {"t": round(now - start, 3), "model": model}
            row.update({key: round(after[model][key] - before[model][key], 3) for key in after[model]})
            rows.append(row)
    return rows


def stalls(rows: list[dict[str, float | str]], min_seconds: float = 1.0,
           model: str = "face_fusion") -> list[tuple[float, float]]:
    """(start, end) of the spans of consecutive intervals, ``min_seconds`` long or more, in which ``model`` completed
    no request."""
    spans: list[tuple[float, float]] = []
    previous_end, open_start = 0.0, None
    for row in (row for row in rows if row["model"] == model):
        end = float(row["t"])
        if float(row["rows"]) == 0.0:
            open_start = previous_end if open_start is None else open_start
        else:
            if open_start is not None and previous_end - open_start >= min_seconds:
                spans.append((open_start, previous_end))
            open_start = None
        previous_end = end
    if open_start is not None and previous_end - open_start >= min_seconds:
        spans.append((open_start, previous_end))
    return spans


def _poll(url: str, interval: float, done: threading.Event,
          samples: list[tuple[float, dict[str, dict[str, float]]]]) -> None:
    while not done.is_set():
        with urllib.request.urlopen(f"{url}/v2/models/stats", timeout=5) as response:
            samples.append((time.monotonic(), cumulative(json.loads(response.read()))))
        done.wait(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=40.0, help="load duration (three perf_analyzer windows)")
    parser.add_argument("--interval", type=float, default=0.5, help="statistics polling period, seconds")
    parser.add_argument("--min-stall", type=float, default=1.0, help="report spans without completions this long")
    parser.add_argument("--distinct-pairs", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    args = parser.parse_args(argv)
    work = REPO_ROOT / ".cache" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    input_data = write_input_data(work / "stall_probe.json", benchmark_pairs(args.distinct_pairs),
                                  options={"target_face": 0})
    ports = free_ports()
    server = start(ports, REPO_ROOT / "out" / "stall-probe-triton.log", model_repository=args.model_repository)
    samples: list[tuple[float, dict[str, dict[str, float]]]] = []
    done = threading.Event()
    try:
        command, env = perf_analyzer_command()
        window_ms = str(max(1000, int(args.seconds * 1000 / 3)))
        command += ["-m", "face_fusion", "-i", "grpc", "-u", f"localhost:{ports.grpc}", "--input-data",
                    str(input_data), "--concurrency-range", f"{args.concurrency}:{args.concurrency}",
                    "--measurement-interval", window_ms, "--stability-percentage", "1000", "--max-trials", "3", "-v"]
        poller = threading.Thread(target=_poll, args=(f"http://127.0.0.1:{ports.http}", args.interval, done, samples),
                                  daemon=True)
        poller.start()
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        done.set()
        poller.join(timeout=10)
    finally:
        done.set()
        stop_process(server)
    rows = deltas(samples)
    tag = f"{datetime.date.today().isoformat()}_{machine_tag()}_c{args.concurrency}"
    csv_path = args.out / f"{tag}_stall_probe.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["t", "model"])
        writer.writeheader()
        writer.writerows(rows)
    passes = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("Pass [")]
    print("\n".join(f"[stall-probe] {line}" for line in passes), flush=True)
    quiet = stalls(rows, args.min_stall)
    spans = ", ".join(f"{start:.1f}-{end:.1f} s" for start, end in quiet[:20])
    print(f"[stall-probe] {len(samples)} samples every {args.interval} s; spans of >= {args.min_stall} s in which "
          f"face_fusion completed nothing: {len(quiet)}{' (' + spans + ')' if quiet else ''}; timeline {csv_path}",
          flush=True)
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

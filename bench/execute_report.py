"""Each model's batches as its stub timed them (facefuse/execute_log.py), over one benchmark level.

    python -m bench.execute_report FOLDER [--since EPOCH_S --until EPOCH_S]
    python -m bench.run ... --execute-log          # one report per face_fusion level, beside the CSV

Per model: batches, requests per batch, ``execute``'s wall time per batch (mean, p50, p99), the share of the window
its instances spent inside ``execute`` (busy), the time between one batch's end and the same instance's next start
(p50: under full load, a batch's cost outside ``execute``), its stages per batch, and the same for its slowest 1 % of
batches (where the tail's time goes, and how much of it no stage accounts for; ``gc``, the garbage collector's
pauses, and ``cpu``, the process's CPU time, happen within the other stages: wall minus cpu is waiting). Set beside
perf_analyzer's "compute infer" for the same level, execute's wall per request (a request's batch, weighted by
its requests as perf_analyzer weights it; larger batches take longer, so it exceeds the mean per batch): compute infer
minus that is what a batch spends between Triton and the stub. bench.run reads the span of perf_analyzer's last
three measurement windows (the ones it reports).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from facefuse.execute_log import OVERLAPPING_STAGES, BatchRecord, read_records


def summarise(records: list[BatchRecord], window_s: float) -> dict[str, dict[str, float]]:
    """Figures per model over ``window_s`` seconds (see the module's docstring); stage keys are ``stage_<name>_ms``."""
    figures: dict[str, dict[str, float]] = {}
    for model in sorted({record.model for record in records}):
        mine = [record for record in records if record.model == model]
        walls = np.array([record.wall_ms for record in mine])
        instances = len({record.pid for record in mine})
        model_figures = {
            "batches": float(len(mine)),
            "instances": float(instances),
            "requests_per_batch": float(np.mean([record.requests for record in mine])),
            "execute_mean_ms": float(walls.mean()),
            # Per request (each request counts its batch's time): what perf_analyzer's compute infer averages.
            "execute_per_request_ms": float(np.average(walls, weights=[record.requests for record in mine])),
            "execute_p50_ms": float(np.percentile(walls, 50)),
            "execute_p99_ms": float(np.percentile(walls, 99)),
            "busy_percent": float(100.0 * walls.sum() / 1000.0 / (window_s * instances)) if window_s > 0 else 0.0,
        }
        # Between one batch's end and the same instance's next start: under full load (requests queued) what a
        # batch costs outside execute (Triton handing inputs and outputs to and from the stub); idle time otherwise.
        gaps = []
        for pid in {record.pid for record in mine}:
            ordered = sorted((record for record in mine if record.pid == pid), key=lambda record: record.start)
            gaps += [(later.start - earlier.end) * 1000.0 for earlier, later in zip(ordered, ordered[1:])]
        model_figures["gap_p50_ms"] = float(np.percentile(gaps, 50)) if gaps else float("nan")
        stages = sorted({stage for record in mine for stage in record.stages})
        for stage in stages:
            values = [record.stages[stage] for record in mine if stage in record.stages]
            model_figures[f"stage_{stage}_ms"] = float(np.mean(values))
        # The slowest 1 % of batches (those at or above the p99): where a tail batch's time goes, stage by stage,
        # and how much of it no stage accounts for (waits, transfers, the stub's own work).
        tail = [record for record in mine if record.wall_ms >= model_figures["execute_p99_ms"]]
        model_figures["tail_batches"] = float(len(tail))
        model_figures["tail_execute_ms"] = float(np.mean([record.wall_ms for record in tail]))
        model_figures["tail_requests_per_batch"] = float(np.mean([record.requests for record in tail]))
        for stage in stages:
            model_figures[f"tail_stage_{stage}_ms"] = float(np.mean([record.stages.get(stage, 0.0) for record in tail]))
        if stages:  # (the collector's pauses and the CPU time happen within the other stages: not added to them)
            model_figures["tail_outside_stages_ms"] = float(np.mean(
                [record.wall_ms - sum(value for stage, value in record.stages.items()
                                      if stage not in OVERLAPPING_STAGES) for record in tail]))
        figures[model] = model_figures
    return figures


def report(records: list[BatchRecord], window_s: float) -> str:
    """``summarise`` as text, one paragraph per model."""
    if not records:
        return "no batches logged (was FACEFUSE_EXECUTE_LOG set for the server?)\n"
    lines = []
    for model, values in summarise(records, window_s).items():
        stages = ", ".join(f"{key[6:-3]} {value:.1f}" for key, value in values.items() if key.startswith("stage_"))
        tail_stages = ", ".join(f"{key[11:-3]} {value:.1f}" for key, value in values.items()
                                if key.startswith("tail_stage_"))
        tail = (f"; slowest 1 % ({values['tail_batches']:.0f} batches): {values['tail_execute_ms']:.1f} ms, "
                f"{values['tail_requests_per_batch']:.1f} requests"
                + (f", stages (ms): {tail_stages}, outside them {values['tail_outside_stages_ms']:.1f}"
                   if tail_stages else ""))
        lines.append(
            f"{model}: {values['batches']:.0f} batches on {values['instances']:.0f} instances over {window_s:.1f} s, "
            f"{values['requests_per_batch']:.1f} requests each; execute {values['execute_mean_ms']:.1f} ms per batch "
            f"(p50 {values['execute_p50_ms']:.1f}, p99 {values['execute_p99_ms']:.1f}; per request, as compute infer "
            f"counts it, {values['execute_per_request_ms']:.1f}); instances inside execute "
            f"{values['busy_percent']:.0f} % of the window; between an instance's batches "
            f"{values['gap_p50_ms']:.1f} ms (p50)" + (f"; stages per batch (ms): {stages}" if stages else "") + tail)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--since", type=float, default=None, help="epoch seconds (default: the first batch)")
    parser.add_argument("--until", type=float, default=None, help="epoch seconds (default: the last batch's end)")
    args = parser.parse_args(argv)
    records = read_records(args.folder, args.since if args.since is not None else float("-inf"),
                           args.until if args.until is not None else float("inf"))
    if not records:
        print(report(records, 0.0), end="")
        return 1
    since = args.since if args.since is not None else min(record.start for record in records)
    until = args.until if args.until is not None else max(record.end for record in records)
    print(report(records, until - since), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

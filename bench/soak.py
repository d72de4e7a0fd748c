"""`make soak`: valid and hostile requests mixed for minutes against a server of its own; nothing valid may fail,
every hostile request must get exactly its code, and memory should stay flat.

    python -m bench.soak [--minutes 10] [--concurrency 8] [--invalid-share 0.25] [--out bench/results]

It starts the local Triton server on free ports (explicit model control, with the stub watchdog), then runs
`concurrency` client threads, half over gRPC and half over HTTP, each sending back to back: valid requests (the
sample photos at several degrees, output formats and faces) and, one in 1/invalid-share, a rotating case of
bench/hostile.py's catalogue with a known code. It samples the RSS of the server and of each Python stub (from /proc)
every few seconds, and writes under --out, named soak_<date>_<machine>:

* `.csv`: one row per request (start, latency, kind, case, protocol, expected, outcome, ok);
* `.png`: latency over time (valid and hostile) above the RSS of the server and of each stub;
* `.md`: the summary printed at the end (counts, code mismatches, throughput, latency percentiles, RSS start/end).

Exit status 1 if any valid request failed, any hostile one got another answer than its code, or a stub died.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.hostile import OK, build_catalogue, hanks, preprocess_limits, scene
from client.api import FusionClient, FusionServerError
from facefuse.imaging import encode_image, image_size
from facefuse.local_server import REPO_ROOT, free_ports, start, stop_process
from facefuse.procfs import rss_bytes, stub_processes
from facefuse.samples import sample_image_path
from facefuse.watchdog import SELF_HEAL_ARGS, StubWatchdog

RSS_EVERY_S = 5.0


@dataclass(frozen=True)
class Job:
    kind: str  # "valid" or "invalid"
    name: str
    source: bytes
    target: bytes
    face_degree: float
    profile_degree: float
    options: dict | bytes
    expect: str  # OK or a code
    size: tuple[int, int] | None = None  # OK: (width, height) of the result


@dataclass
class Record:
    start_s: float
    latency_s: float
    kind: str
    name: str
    protocol: str
    expect: str
    outcome: str
    ok: bool


def valid_jobs() -> list[Job]:
    """The sample photos both ways round, at several degrees, output formats and chosen faces."""
    portrait = sample_image_path("Tom_Hanks_54745.png").read_bytes()
    group = sample_image_path("t1.jpg").read_bytes()
    cut = encode_image(scene(), "jpeg", 92)
    hanks_png = encode_image(hanks(), "png")
    jobs = []
    plans = [("hanks_into_group", portrait, group, {"target_face": 0}),
             ("hanks_into_group_face3", portrait, group, {"target_face": 3, "format": "png"}),
             ("group_face2_into_hanks", group, portrait, {"source_face": 2, "format": "webp"}),
             ("hanks_into_scene", hanks_png, cut, {"visible_label": True}),
             ("scene_into_scene", cut, cut, {"source_face": 1, "target_face": 0, "quality": 80})]
    for (name, source, target, options), (face, profile) in zip(
            itertools.cycle(plans), [(100, 100), (50, 50), (0, 0), (80, 30), (30, 80), (100, 0), (65, 65),
                                     (0, 100), (100, 100), (50, 50)]):
        jobs.append(Job("valid", f"{name}@{face}/{profile}", source, target, face, profile, options, OK,
                        image_size(target)))
    return jobs


def invalid_jobs() -> list[Job]:
    """Every hostile case with a known code, except the megabyte-sized ones."""
    return [Job("invalid", case.name, case.source, case.target, case.face_degree, case.profile_degree, case.options,
                case.expect) for case in build_catalogue(preprocess_limits()) if case.expect != OK and not case.heavy]


def run_one(client: FusionClient, job: Job) -> tuple[str, bool]:
    """(outcome, ok) of one request: OK <w>x<h>, a code, or the unexpected error."""
    try:
        result = client.fuse(job.source, job.target, job.face_degree, job.profile_degree, job.options)
    except FusionServerError as error:
        outcome = error.code or f"{error.status}: {error.raw[:120]}"
        return outcome, error.code == job.expect
    except Exception as error:  # noqa: BLE001 - any transport failure is a failed request, recorded as such
        return f"{type(error).__name__}: {str(error)[:120]}", False
    width, height = image_size(result.image)
    return f"OK {width}x{height}", job.expect == OK and (width, height) == job.size


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values) * 1000.0
    return {f"p{q}": float(np.percentile(array, q)) for q in (50, 90, 99)} | {"max": float(array.max())}


def server_rss(pid: int) -> dict[str, int]:
    """RSS in bytes of the server and of each stub instance, keyed 'tritonserver' / instance name."""
    sizes = {"tritonserver": rss_bytes(pid) or 0}
    sizes.update({instance: rss_bytes(stub.pid) or 0 for instance, stub in stub_processes(pid).items()})
    return sizes


def plot(records: list[Record], rss: list[tuple[float, dict[str, int]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=(3, 2))
    for kind, colour in (("valid", "tab:blue"), ("invalid", "tab:orange")):
        rows = [r for r in records if r.kind == kind]
        top.scatter([r.start_s for r in rows], [r.latency_s * 1000 for r in rows], s=4, alpha=0.5, color=colour,
                    label=f"{kind} ({len(rows)})")
    failed = [r for r in records if not r.ok]
    if failed:
        top.scatter([r.start_s for r in failed], [r.latency_s * 1000 for r in failed], s=30, marker="x",
                    color="red", label=f"failed / mismatched ({len(failed)})")
    top.set_yscale("log")
    top.set_ylabel("latency (ms)")
    top.grid(alpha=0.3, which="both")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(title, fontsize=10)
    names = sorted({name for _, sizes in rss for name in sizes})
    for name in names:
        bottom.plot([t for t, _ in rss], [sizes.get(name, 0) / 2**20 for _, sizes in rss], label=name)
    bottom.set_ylabel("RSS (MiB)")
    bottom.set_xlabel("seconds since start")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--invalid-share", type=float, default=0.25, help="fraction of requests that are hostile")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--machine", default=None, help="tag for file names (default: GPU name or cpuN)")
    args = parser.parse_args(argv)
    from bench.run import machine_tag

    tag = f"soak_{datetime.date.today().isoformat()}_{args.machine or machine_tag()}"
    args.out.mkdir(parents=True, exist_ok=True)
    valid, invalid = valid_jobs(), invalid_jobs()
    every = max(1, round(1 / args.invalid_share)) if args.invalid_share > 0 else 0
    ports = free_ports()
    log = REPO_ROOT / "out" / "soak-triton.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text("")
    print(f"[soak] {tag}: {args.minutes:g} min, concurrency {args.concurrency}, {len(valid)} valid and "
          f"{len(invalid)} hostile request kinds, 1 in {every or 'no'} hostile; starting the server", flush=True)
    server = start(ports, log, extra=list(SELF_HEAL_ARGS), quiet=True)
    watchdog = StubWatchdog(server.pid, f"127.0.0.1:{ports.http}").start()
    counter = itertools.count()
    records: list[Record] = []
    rss: list[tuple[float, dict[str, int]]] = []
    lock = threading.Lock()
    began = time.monotonic()
    deadline = began + args.minutes * 60.0
    rss.append((0.0, server_rss(server.pid)))

    def worker(protocol: str) -> None:
        port = ports.grpc if protocol == "grpc" else ports.http
        with FusionClient(f"127.0.0.1:{port}", protocol, timeout_s=600) as client:
            while time.monotonic() < deadline:
                number = next(counter)
                job = (invalid[(number // every) % len(invalid)] if every and number % every == every - 1
                       else valid[number % len(valid)])
                started = time.monotonic()
                outcome, ok = run_one(client, job)
                with lock:
                    records.append(Record(started - began, time.monotonic() - started, job.kind, job.name,
                                          protocol, job.expect, outcome, ok))

    threads = [threading.Thread(target=worker, args=(("grpc", "http")[i % 2],), daemon=True)
               for i in range(args.concurrency)]
    try:
        for thread in threads:
            thread.start()
        next_report = began + 30.0
        while any(thread.is_alive() for thread in threads):
            time.sleep(0.5)
            now = time.monotonic()
            if now - began >= len(rss) * RSS_EVERY_S:
                rss.append((now - began, server_rss(server.pid)))
            if now >= next_report:
                with lock:
                    done, bad = len(records), sum(1 for r in records if not r.ok)
                print(f"[soak] {now - began:5.0f} s: {done} requests, {bad} failed or mismatched", flush=True)
                next_report += 30.0
        elapsed = time.monotonic() - began
        rss.append((elapsed, server_rss(server.pid)))
    finally:
        watchdog.stop()
        stop_process(server)
    return report(records, rss, watchdog.reloads, elapsed, args, tag)


def report(records: list[Record], rss: list[tuple[float, dict[str, int]]], reloads: list, elapsed: float,
           args: argparse.Namespace, tag: str) -> int:
    valid = [r for r in records if r.kind == "valid"]
    invalid = [r for r in records if r.kind == "invalid"]
    failed = [r for r in valid if not r.ok]
    mismatched = [r for r in invalid if not r.ok]
    csv_path, png_path, md_path = (args.out / f"{tag}.{suffix}" for suffix in ("csv", "png", "md"))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["start_s", "latency_ms", "kind", "case", "protocol", "expected", "outcome", "ok"])
        for r in records:
            writer.writerow([f"{r.start_s:.3f}", f"{r.latency_s * 1000:.1f}", r.kind, r.name, r.protocol, r.expect,
                             r.outcome, int(r.ok)])
    plot(records, rss, png_path, f"{tag}: {args.concurrency} clients, {elapsed / 60:.1f} min")
    codes: dict[str, int] = {}
    for r in invalid:
        codes[r.expect] = codes.get(r.expect, 0) + 1
    first, last = rss[0][1], rss[-1][1]
    lines = [
        f"# Soak {tag}",
        "",
        f"{elapsed / 60:.1f} min, {args.concurrency} clients (half gRPC, half HTTP), server with the stub watchdog.",
        "",
        "| | count |",
        "|---|---|",
        f"| valid sent | {len(valid)} |",
        f"| valid succeeded | {len(valid) - len(failed)} |",
        f"| valid failed | {len(failed)} |",
        f"| hostile sent | {len(invalid)} |",
        f"| hostile with the expected code | {len(invalid) - len(mismatched)} |",
        f"| hostile mismatched | {len(mismatched)} |",
        f"| stub reloads by the watchdog | {len(reloads)} |",
        "",
        f"Throughput: {len(valid) / elapsed:.2f} valid fusions/s, {len(records) / elapsed:.2f} requests/s in all.",
        "",
        "| latency (ms) | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|",
    ]
    for name, rows in (("valid", valid), ("hostile", invalid)):
        figures = percentiles([r.latency_s for r in rows])
        if figures:
            lines.append(f"| {name} | {figures['p50']:.0f} | {figures['p90']:.0f} | {figures['p99']:.0f} | "
                         f"{figures['max']:.0f} |")
    lines += ["", "Hostile codes sent: " + ", ".join(f"{code} x{count}" for code, count in sorted(codes.items())),
              "", "| process | RSS start (MiB) | RSS end (MiB) | change |", "|---|---|---|---|"]
    for name in sorted(set(first) | set(last)):
        start_mib, end_mib = first.get(name, 0) / 2**20, last.get(name, 0) / 2**20
        lines.append(f"| {name} | {start_mib:.0f} | {end_mib:.0f} | {end_mib - start_mib:+.0f} |")
    for title, rows in (("Valid requests that failed", failed), ("Hostile requests with another answer", mismatched)):
        if rows:
            lines += ["", f"{title} (first 20):", ""]
            lines += [f"- {r.name} over {r.protocol}: expected {r.expect}, got {r.outcome}" for r in rows[:20]]
    lines += ["", f"Files: {csv_path.name}, {png_path.name}."]
    text = "\n".join(lines) + "\n"
    md_path.write_text(text)
    print(text)
    print(f"[soak] wrote {csv_path}, {png_path}, {md_path}")
    return 1 if failed or mismatched or reloads else 0


if __name__ == "__main__":
    sys.exit(main())

"""The wall time of every served batch, when the environment variable FACEFUSE_EXECUTE_LOG names a folder.

perf_analyzer reports each composing model's "compute infer" per batch: Triton's view, which for a Python model
includes handing the batch to the stub process and back. This is the stub's own view: each instance appends one line
per ``execute`` call to ``<folder>/<model>-<pid>.tsv`` (wall start and end in seconds since the epoch, the batch's
requests, and the stage timings the model reports, e.g. preprocess's decode/detect/align per row). bench.run
(``--execute-log``) turns the lines of each level into a report (bench/execute_report.py): whether a batch's time
under load is spent inside ``execute`` (our code, stretched by sharing the GPU or the CPU) or around it.
Off (the default), ``ExecuteLog.batch`` costs one attribute check. On, each batch also records ``gc``: the ms its
process spent in Python's cyclic garbage collector during the batch (it overlaps the other stages, which it
stretches; a full collection walks every tracked object unless the heap was frozen: hostmem.freeze_heap), and
``cpu``: the CPU time its process used during the batch, all threads (so it can exceed the wall time; for a
single-threaded batch wall minus ``cpu`` is time spent waiting: for the GPU, a lock, the scheduler).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ENVIRONMENT_VARIABLE = "FACEFUSE_EXECUTE_LOG"
# The stages that record garbage-collector pauses and the process's CPU time: within the other stages' time, not
# beside it.
GC_STAGE = "gc"
CPU_STAGE = "cpu"
OVERLAPPING_STAGES = (GC_STAGE, CPU_STAGE)


class _CollectorClock:
    """gc.callbacks entry adding up the wall time of this process's garbage collections."""

    def __init__(self) -> None:
        self.total_ms = 0.0
        self._started: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.total_ms += (time.perf_counter() - self._started) * 1000.0
            self._started = None


_COLLECTOR_CLOCK = _CollectorClock()


@dataclass
class BatchRecord:
    """One ``execute`` call: ``stages`` the model's own stage timings in ms for the whole batch (may be empty)."""

    model: str
    pid: int
    start: float
    end: float
    requests: int
    stages: dict[str, float]

    @property
    def wall_ms(self) -> float:
        return (self.end - self.start) * 1000.0


class ExecuteLog:
    """Appends one line per batch for ``model`` when FACEFUSE_EXECUTE_LOG (or ``folder``) is set; else does nothing."""

    def __init__(self, model: str, folder: str | Path | None = None) -> None:
        folder = folder if folder is not None else os.environ.get(ENVIRONMENT_VARIABLE) or None
        self.model = model
        self._file = None
        self._stages: dict[str, float] = {}  # the batch being timed
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            # Line-buffered: a line is whole on disk once written, so a reader mid-run sees whole batches only.
            self._file = open(Path(folder) / f"{model}-{os.getpid()}.tsv", "a", buffering=1)  # noqa: SIM115
            if _COLLECTOR_CLOCK not in gc.callbacks:
                gc.callbacks.append(_COLLECTOR_CLOCK)

    @property
    def enabled(self) -> bool:
        return self._file is not None

    @contextlib.contextmanager
    def batch(self, requests: int) -> Iterator[None]:
        """Times the block as one batch of ``requests``; ``note`` inside it adds stage timings."""
        if self._file is None:
            yield
            return
        self._stages = {}
        collected_before = _COLLECTOR_CLOCK.total_ms
        cpu_before = time.process_time()
        start = time.time()
        try:
            yield
        finally:
            end = time.time()
            self._stages[CPU_STAGE] = round((time.process_time() - cpu_before) * 1000.0, 3)
            self._stages[GC_STAGE] = round(_COLLECTOR_CLOCK.total_ms - collected_before, 3)
            stages = json.dumps(self._stages, separators=(",", ":"))
            self._file.write(f"{start:.6f}\t{end:.6f}\t{requests}\t{stages}\n")

    def note(self, stages: dict[str, float]) -> None:
        """Stage timings (ms for the whole batch) of the batch being timed."""
        self._stages.update(stages)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def batch_stages(per_row_timings: list[dict[str, float]], stages: tuple[str, ...]) -> dict[str, float]:
    """The batch's time (ms) in each of ``stages``, from its rows' ``timings_ms`` metadata, which hold a stage's
    time per row (the batch's time shared out), summed over the rows."""
    if not per_row_timings:
        return {}
    return {stage: round(sum(float(row[stage]) for row in per_row_timings), 3)
            for stage in stages if all(stage in row for row in per_row_timings)}


def read_records(folder: Path, since: float = float("-inf"), until: float = float("inf")) -> list[BatchRecord]:
    """Every logged batch that started in [since, until), from all models and processes."""
    records = []
    for path in sorted(Path(folder).glob("*-*.tsv")):
        model, _, pid = path.stem.rpartition("-")
        for line in path.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) != 4:
                continue  # a line cut short by a killed process
            start, end = float(fields[0]), float(fields[1])
            if since <= start < until:
                records.append(BatchRecord(model, int(pid), start, end, int(fields[2]), json.loads(fields[3])))
    return records

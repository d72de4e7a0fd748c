"""The GPU's memory and busy share while a benchmark level runs, sampled from nvidia-smi in a background thread.

bench.run adds ``gpu_memory_peak_mib`` (the most memory in use on the GPU, every process together: the model
stubs' caches filled an 80 GB H100 with 12 instances) and ``gpu_busy_percent`` (nvidia-smi's utilization.gpu,
averaged) to each level's row. On a host without nvidia-smi the sampler gives nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Sequence

QUERY = ("nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits")


def parse_sample(text: str) -> tuple[float, float] | None:
    """(MiB in use, % busy) of the first GPU in nvidia-smi's csv line, or None if it is not one (an error text)."""
    lines = text.strip().splitlines()
    parts = [part.strip() for part in lines[0].split(",")] if lines else []
    try:
        memory, busy = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        return None
    return memory, busy


class GpuSampler:
    """Samples ``command`` (nvidia-smi's query) every ``interval_s`` from start() until stop(), which returns the
    peak memory and mean busy share; {} where the command is missing or never answered."""

    def __init__(self, interval_s: float = 0.5, command: Sequence[str] = QUERY) -> None:
        self.interval_s = interval_s
        self.command = list(command)
        self.samples: list[tuple[float, float]] = []
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> GpuSampler:
        if shutil.which(self.command[0]) is not None:
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                answer = subprocess.run(self.command, capture_output=True, text=True, timeout=10, check=False)
            except (OSError, subprocess.TimeoutExpired):
                answer = None
            sample = parse_sample(answer.stdout) if answer is not None and answer.returncode == 0 else None
            if sample is not None:
                self.samples.append(sample)
            self._stopped.wait(self.interval_s)

    def stop(self) -> dict[str, float]:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
        if not self.samples:
            return {}
        return {"gpu_memory_peak_mib": max(memory for memory, _ in self.samples),
                "gpu_busy_percent": round(sum(busy for _, busy in self.samples) / len(self.samples), 1)}

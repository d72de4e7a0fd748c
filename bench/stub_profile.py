"""Where the Python models spend their time while served: py-spy samples every stub of a running Triton server.

    python -m bench.stub_profile --server-pid PID [--seconds 15] [--out report.txt]
    python -m bench.run ... --profile-stubs          # one report per face_fusion level, beside the CSV

perf_analyzer says how long each model computes per batch; this says on what, per model (its instances together):
the share of each model's busy samples spent under each call made from its ``execute``, two frames deep, and what
ran outside ``execute`` (the stub's own work). py-spy (pinned in requirements.txt) samples from outside the process
and needs ptrace rights over it; only busy samples of Python threads count (a stub waiting for requests takes none;
one spinning on a CUDA sync does). Native worker threads (OpenMP's, ONNX Runtime's) are not sampled: their work
shows under the Python call that started it, and the CPU cores bench.run reports from /proc include them.

``--wall`` (``bench.run --profile-stubs wall``) samples idle threads too (py-spy ``--idle``) and counts only samples
inside ``execute``, three frames deep: where a request's wall time goes, waits included (a thread asleep in a
blocking CUDA sync, a lock or I/O is idle to py-spy and missing from the busy profile).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from facefuse.procfs import stub_processes

ANCHOR = "TritonPythonModel.execute"
_GLUE = ("guarded ", "TritonPythonModel._execute ")
_LOCATION = re.compile(r" \((.*)\)$")


def find_py_spy() -> str | None:
    """The py-spy binary: on PATH, else beside this interpreter (a venv's bin without activation)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


@dataclass
class ModelProfile:
    """Collapsed-stack samples of one model's stubs, keyed by what ``execute`` called (``depth`` frames)."""

    model: str
    wall: bool = False  # samples of idle threads too; only those inside execute count
    samples: int = 0
    calls: collections.Counter = field(default_factory=collections.Counter)

    def add_raw(self, text: str, depth: int | None = None) -> None:
        """Add py-spy's ``--format raw`` output: one "frame;frame;... count" line per distinct stack."""
        depth = depth or (3 if self.wall else 2)
        for line in text.splitlines():
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [_LOCATION.sub(r" [\1]", frame) for frame in stack.split(";")]
            anchor = next((index for index, frame in enumerate(frames) if frame.startswith(ANCHOR)), None)
            if anchor is None:
                if self.wall:  # a thread waiting for work, not a request's time
                    continue
                key = "(outside execute) " + " > ".join(frames[-depth:])
            else:
                # Our error-isolating wrapper and the model's own _execute are not news: skip them.
                below = [frame for frame in frames[anchor + 1:] if not frame.startswith(_GLUE)]
                key = " > ".join(below[:depth]) or "(execute itself)"
            self.calls[key] += int(count)
            self.samples += int(count)

    def report(self, seconds: float, rate: int, top: int = 12) -> str:
        busy = self.samples / rate / seconds if seconds else 0.0
        if self.wall:
            lines = [f"{self.model}: {self.samples} samples in execute (idle included) = {busy:.2f} threads in "
                     f"execute over {seconds:.0f} s"]
        else:
            lines = [f"{self.model}: {self.samples} busy samples = {busy:.2f} Python threads busy over "
                     f"{seconds:.0f} s"]
        lines += [f"  {count / max(1, self.samples):6.1%}  {call}" for call, count in self.calls.most_common(top)]
        return "\n".join(lines)


class StubProfiler:
    """py-spy on every stub of ``server_pid`` for ``seconds``; ``finish`` waits and returns the report text."""

    def __init__(self, server_pid: int, seconds: float, folder: Path, rate: int = 200, wall: bool = False) -> None:
        binary = find_py_spy()
        if binary is None:
            raise RuntimeError("py-spy is not installed (pip install -r requirements.txt pins it)")
        self.seconds, self.rate, self.wall = seconds, rate, wall
        self.profiles: dict[str, ModelProfile] = {}  # per model, once finish has run
        folder.mkdir(parents=True, exist_ok=True)
        self.runs: list[tuple[str, Path, subprocess.Popen]] = []
        commands = []
        for instance, stub in sorted(stub_processes(server_pid).items()):
            path = folder / f"{instance}.raw"
            path.unlink(missing_ok=True)  # a report must not pick up an earlier run's samples
            commands.append([binary, "record", "--pid", str(stub.pid), "--duration", str(int(seconds)), "--rate",
                             str(rate), "--format", "raw", "--nonblocking", "-o", str(path), *(["--idle"] * wall)])
            self.runs.append((stub.model, path, self._spawn(commands[-1])))
        if not self.runs:
            raise RuntimeError(f"no Python-backend stubs found under server pid {server_pid}")
        # A py-spy that failed at once is started again (on this CI-like host one sometimes could not read a Python
        # process's version at the first try).
        for _ in range(2):
            time.sleep(1.0)
            failed = [index for index, (_, _, process) in enumerate(self.runs) if process.poll() not in (None, 0)]
            for index in failed:
                model, path, _ = self.runs[index]
                self.runs[index] = (model, path, self._spawn(commands[index]))
            if not failed:
                break

    @staticmethod
    def _spawn(command: list[str]) -> subprocess.Popen:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finish(self) -> str:
        profiles: dict[str, ModelProfile] = {}
        problems = []
        for model, path, process in self.runs:
            _, stderr = process.communicate(timeout=self.seconds + 60)
            profile = profiles.setdefault(model, ModelProfile(model, wall=self.wall))
            if path.exists():
                profile.add_raw(path.read_text())
            else:  # e.g. no ptrace rights over the stub
                problems.append(f"{model} ({path.stem}): py-spy wrote nothing: {stderr.strip()[-300:]}")
        self.profiles = profiles
        sections = [profile.report(self.seconds, self.rate) for _, profile in sorted(profiles.items())]
        return "\n\n".join(sections + problems) + "\n"

    def coverage(self, figures: dict[str, float]) -> list[str]:
        """After ``finish``, in wall mode: per model, the threads in ``execute`` py-spy saw against those Triton's
        statistics imply (requests/s / average batch x compute ms per batch, from bench.run's ``figures``). py-spy
        drops a sample it cannot read, and --nonblocking reads a thread in native code badly: on the H100 host it
        saw 0.02 threads where Triton implied 0.49. A share far from 100 % says the proportions rest on the
        samples py-spy happened to read."""
        lines = []
        for model, profile in sorted(self.profiles.items()):
            compute_ms, batch = figures.get(f"{model}_infer_ms"), figures.get(f"{model}_batch")
            throughput = figures.get("throughput_per_s")
            if not self.wall or not compute_ms or not batch or not throughput:
                continue
            implied = throughput / batch * compute_ms / 1000.0
            seen = profile.samples / self.rate / self.seconds
            lines.append(f"{model}: py-spy saw {seen:.2f} threads in execute, Triton's compute times imply "
                         f"{implied:.2f} ({seen / implied:.0%})")
        return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--wall", action="store_true", help="idle samples inside execute too (waits included)")
    args = parser.parse_args(argv)
    folder = Path(".cache") / "bench" / "stub_profile"
    report = StubProfiler(args.server_pid, args.seconds, folder, wall=args.wall).finish()
    print(report, end="")
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Find a Triton server's Python-backend stub processes and read their memory and CPU time, from /proc (Linux only).

The Python backend runs each model instance in its own `triton_python_backend_stub` child process. Its command line
is `<stub> <repository>/<model>/<version>/model.py <shm region> <sizes> <parent pid> <backend dir> <ipc> <instance>
...`; the model is read from the path and the instance name (e.g. `postprocess_0_0`) from the ninth argument.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"
_NUMBERING = re.compile(r"\d+")  # thread names' own numbers, folded so that a pool's threads add up
_INSTANCE_ARG = 8  # position of the instance name in the stub's argv (Triton 2.51 python backend)


@dataclass(frozen=True)
class Stub:
    pid: int
    model: str
    instance: str


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _stat(path: str) -> tuple[str, list[str]]:
    """(command name, the fields after it: state, ppid, ...) of a /proc stat file (the name may hold spaces and
    parentheses); ("", []) when it is gone."""
    try:
        raw = Path(path).read_text()
        return raw[raw.index("(") + 1:raw.rindex(")")], raw.rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return "", []


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: state, ppid, ..."""
    return _stat(f"/proc/{pid}/stat")[1]


def _cpu_of(fields: list[str]) -> float | None:
    """utime + stime (stat fields 14, 15) in seconds, or None for a stat that is gone."""
    if len(fields) < 13:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def is_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a killed child stays a zombie until its parent reaps it)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def stub_processes(server_pid: int) -> dict[str, Stub]:
    """{instance name: Stub} for the live stubs whose parent is `server_pid`."""
    stubs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        args = _cmdline(pid)
        if len(args) < 2 or not args[0].endswith(STUB_NAME):
            continue
        fields = _stat_fields(pid)
        if len(fields) < 2 or int(fields[1]) != server_pid or fields[0] == "Z":
            continue
        model = Path(args[1]).parent.parent.name  # <repository>/<model>/<version>/model.py
        instance = args[_INSTANCE_ARG] if len(args) > _INSTANCE_ARG else f"{model}_{pid}"
        stubs[instance] = Stub(pid, model, instance)
    return stubs


def group_members(group_id: int) -> list[int]:
    """The live (not zombie) processes in process group `group_id`, in pid order."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if len(fields) > 2 and int(fields[2]) == group_id and fields[0] != "Z":
                members.append(int(entry))
    return sorted(members)


def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid`, or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def processes_named(name: str) -> list[int]:
    """The live processes whose program (first argument) is called `name`, in pid order."""
    return sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit()
                  and (args := _cmdline(int(entry))) and Path(args[0]).name == name and is_alive(int(entry)))


def environment(pid: int) -> dict[str, str] | None:
    """`pid`'s environment as it was started, or None when it is gone or not ours to read."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def find_server_pid(name: str = "tritonserver") -> int | None:
    """The pid of the one live process whose executable is called `name` (None if there are none or several)."""
    found = processes_named(name)
    return found[0] if len(found) == 1 else None


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) `pid` has used so far, or None when it is gone."""
    return _cpu_of(_stat_fields(pid))


def thread_cpu_by_id(pid: int) -> dict[int, tuple[str, float]]:
    """CPU time (user + system) of each of `pid`'s threads so far, by thread id: (OS thread name, seconds); a
    single saturated thread (a serialisation point) shows here where a sum by name hides it. {} when `pid` is gone."""
    found: dict[int, tuple[str, float]] = {}
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for thread in threads:
        name, fields = _stat(f"/proc/{pid}/task/{thread}/stat")
        seconds = _cpu_of(fields)
        if seconds is not None:  # else the thread ended meanwhile
            found[int(thread)] = (name, seconds)
    return found


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time (user + system) each group of `pid`'s threads has used so far, keyed by thread name with its
    numbering folded (``ThreadPool-3`` and ``ThreadPool-7`` -> ``ThreadPool-#``): which runtime's threads keep the
    cores busy (CUDA's event handler, OpenMP's workers, nvJPEG's, ...). The process's main thread (in a Python stub
    the one running ``execute``) is ``main``, apart from the threads that inherited its name (on the H100 every
    busy stub thread was called ``triton_python_b``). {} when `pid` is gone."""
    totals: dict[str, float] = {}
    for thread, (name, seconds) in thread_cpu_by_id(pid).items():
        name = "main" if thread == pid else _NUMBERING.sub("#", name) or "?"
        totals[name] = totals.get(name, 0.0) + seconds
    return totals


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, over all cores (/proc/stat; idle and iowait count as
    not busy)."""
    values = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (total - values[3] - values[4]) / os.sysconf("SC_CLK_TCK"), total / os.sysconf("SC_CLK_TCK")

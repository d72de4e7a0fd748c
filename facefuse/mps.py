"""CUDA MPS (Multi-Process Service) for the local server's GPU model processes.

Every Python-backend model instance is its own process with its own CUDA context; without MPS one GPU runs one
context at a time and the others wait for their time slice, so more preprocess/postprocess instances barely help
(H200, c=128, 4 preprocess + 2 postprocess instances: 117 images/s without MPS, 262 with it). With MPS the
contexts' kernels share the GPU. This starts a private control daemon (its pipe and log
folders under ``folder``) and gives the environment that points CUDA processes at it; ``stop`` ends it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from facefuse.procfs import environment, processes_named

CONTROL = "nvidia-cuda-mps-control"
SERVER = "nvidia-cuda-mps-server"  # started by the daemon for the first client; carries every client's GPU calls
DEFAULT_PIPE_FOLDER = "/tmp/nvidia-mps"  # the driver's, where CUDA_MPS_PIPE_DIRECTORY is unset


class MpsUnavailable(RuntimeError):
    """MPS cannot run here; the message says why."""


@dataclass
class MpsDaemon:
    pipe_folder: Path
    log_folder: Path

    def environment(self) -> dict[str, str]:
        """What a CUDA process needs in its environment to become this daemon's client."""
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_folder), "CUDA_MPS_LOG_DIRECTORY": str(self.log_folder)}

    def control(self, command: str, timeout_s: float = 10.0) -> str:
        result = subprocess.run([CONTROL], input=command + "\n", capture_output=True, text=True, timeout=timeout_s,
                                env={**os.environ, **self.environment()}, check=False)
        return result.stdout.strip()

    def stop(self, wait_s: float = 30.0) -> bool:
        """Quit the daemon (its servers exit once their clients have) and wait up to ``wait_s`` for it to be gone,
        so that a benchmark run next does not meet it: on the device tool's H100 a daemon left behind kept the next
        `-d` refused for over a minute and a later server failed to load its models. True once it is gone."""
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # already gone: nothing to stop
            self.control("quit")
        deadline = time.monotonic() + wait_s
        while any(folder == str(self.pipe_folder) for _, folder in running_daemons()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True


def running_daemons() -> list[tuple[int, str]]:
    """(pid, pipe folder) of each MPS control daemon on this host that this user may inspect; the folder from its
    environment's CUDA_MPS_PIPE_DIRECTORY, else the driver's default."""
    daemons = []
    for pid in processes_named(CONTROL):
        variables = environment(pid)
        if variables is not None:  # None: gone meanwhile, or not ours to read
            daemons.append((pid, variables.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_PIPE_FOLDER)))
    return daemons


def mps_problem(device_folder: Path = Path("/dev")) -> str | None:
    """Why MPS cannot run on this host (no GPU, no control binary), or None when it can be tried."""
    if not any(path.name.removeprefix("nvidia").isdigit() for path in device_folder.glob("nvidia*")):
        return "MPS needs an NVIDIA GPU; none is visible (/dev/nvidiaN)"
    if shutil.which(CONTROL) is None:
        return f"{CONTROL} is not on PATH (it comes with the NVIDIA driver's utilities)"
    return None


def start_mps(folder: Path, device_folder: Path = Path("/dev"), wait_s: float = 60.0) -> MpsDaemon:
    """Start an MPS control daemon private to ``folder``; MpsUnavailable when there is no GPU or no control binary
    (it ships with the NVIDIA driver's utilities) or the daemon does not come up.

    A daemon told to quit lingers until its last client (a server's model processes) has exited, and meanwhile
    refuses a new one ("already running"): seen when one benchmark followed another. Retry for up to ``wait_s``."""
    problem = mps_problem(device_folder)
    if problem:
        raise MpsUnavailable(problem)
    binary = shutil.which(CONTROL)
    daemon = MpsDaemon(folder / "pipe", folder / "log")
    for path in (daemon.pipe_folder, daemon.log_folder):
        path.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        result = subprocess.run([binary, "-d"], capture_output=True, text=True, timeout=30, check=False,
                                env={**os.environ, **daemon.environment()})
        if result.returncode == 0 or "already running" not in (result.stderr + result.stdout) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if result.returncode != 0:
        message = f"{CONTROL} -d failed ({result.returncode}): {(result.stderr or result.stdout).strip()}"
        others = running_daemons()
        if others:  # name the daemon in the way, and how to end it
            listed = ", ".join(f"pid {pid} (pipe folder {folder})" for pid, folder in others)
            message += (f"; running: {listed}; end one with: echo quit | CUDA_MPS_PIPE_DIRECTORY=<its pipe folder> "
                        f"{CONTROL}")
        raise MpsUnavailable(message)
    return daemon

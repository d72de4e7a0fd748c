"""Extra local Triton servers for the reliability tests: a patched copy of the model repository, and a server that
a test may stop, signal and start again on the same ports."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from facefuse.local_server import MODEL_REPOSITORY, REPO_ROOT, Ports, free_ports, start
from facefuse.local_server import is_ready as local_is_ready


def copy_repository(destination: Path, edits: dict[str, Callable[[str], str]] | None = None) -> Path:
    """Copy model_repository/ to `destination`, applying `edits` {model: config text -> config text}."""
    shutil.copytree(MODEL_REPOSITORY, destination, ignore=shutil.ignore_patterns("__pycache__", "*.plan"))
    for model, edit in (edits or {}).items():
        config = destination / model / "config.pbtxt"
        config.write_text(edit(config.read_text()))
    return destination


def set_queue_policy(max_queue_size: int, timeout_us: int) -> Callable[[str], str]:
    """A config edit replacing the values of the model's default_queue_policy."""
    def edit(text: str) -> str:
        text, found = re.subn(r"max_queue_size: \d+", f"max_queue_size: {max_queue_size}", text)
        text, timeouts = re.subn(r"default_timeout_microseconds: \d+", f"default_timeout_microseconds: {timeout_us}",
                                 text)
        assert found == 1 and timeouts == 1, "the config has no default_queue_policy to edit"
        return text
    return edit


def _shm_regions(server_pid: int) -> list[str]:
    """Names of the /dev/shm regions of the server's stubs (their second argument)."""
    regions = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            stub = len(args) > 6 and args[0].endswith(b"triton_python_backend_stub")
            if stub and args[5] == str(server_pid).encode():  # argv: stub, model.py, region, sizes, parent pid
                regions.append(args[2].decode())
    return regions


def is_ready(ports: Ports) -> bool:
    return local_is_ready(ports, timeout_s=5.0)


class ManagedServer:
    """A server on fixed ports that tests may stop, signal or start again; `tainted` marks one whose graceful exit
    is known to be stuck (see tests/test_faults.py)."""

    def __init__(self, log: Path, model_repository: Path = MODEL_REPOSITORY, extra: list[str] | None = None) -> None:
        self.ports = free_ports()
        self.log = log
        self.model_repository = model_repository
        self.extra = list(extra or [])
        self.process: subprocess.Popen | None = None
        self.tainted = False
        self.starts = 0
        self.regions: set[str] = set()  # /dev/shm regions of this server's stubs, removed after a kill

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> subprocess.Popen:
        assert not self.running
        self.process = start(self.ports, self.log, self.model_repository, timeout_s=300, extra=self.extra,
                             quiet=True)
        self.regions = set(_shm_regions(self.process.pid))
        self.tainted = False
        self.starts += 1
        return self.process

    def ensure_fresh(self) -> None:
        """Running, and not tainted by an earlier fault."""
        if self.running and self.tainted:
            self.kill()
        if not self.running:
            self.start()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL the server and its stubs (its own process group), then remove the shared-memory regions that
        the python backend would have unlinked on a clean exit."""
        if self.process is not None and self.process.poll() is None:
            regions = self.regions | set(_shm_regions(self.process.pid))  # a dead stub's region is still there
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            for region in regions:
                (Path("/dev/shm") / region).unlink(missing_ok=True)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Graceful stop (SIGINT), SIGKILL after `timeout_s`; a tainted server is killed at once."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        if self.tainted:
            self.kill()
            return self.process.returncode
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode


def set_parameter(key: str, value: str) -> Callable[[str], str]:
    """A config edit giving the model's existing string parameter `key` the value `value`."""
    from bench.repository import set_string_parameter

    return lambda text: set_string_parameter(text, key, value, "edited model")


def serve_patched_copy(folder: Path, log_name: str,
                       edits: dict[str, Callable[[str], str]]) -> Iterator[ManagedServer]:
    """For a module fixture: a server on a copy of the repository with `edits` (see copy_repository) in `folder`,
    logging to out/`log_name` (emptied first); stopped when the fixture ends."""
    repository = copy_repository(folder / "model_repository", edits)
    log = REPO_ROOT / "out" / log_name
    log.parent.mkdir(exist_ok=True)
    log.write_text("")
    server = ManagedServer(log, repository)
    server.start()
    yield server
    server.stop()

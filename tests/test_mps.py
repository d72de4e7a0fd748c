"""facefuse/mps.py: MPS is refused with a reason where it cannot run, and really starts where it can."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from facefuse.mps import CONTROL, MpsUnavailable, start_mps


def test_no_gpu_means_no_mps_and_says_so(tmp_path: Path):
    with pytest.raises(MpsUnavailable, match="needs an NVIDIA GPU"):
        start_mps(tmp_path / "mps", device_folder=tmp_path)


def test_missing_control_binary_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "nvidia0").touch()
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without the driver's utilities
    with pytest.raises(MpsUnavailable, match=CONTROL):
        start_mps(tmp_path / "mps", device_folder=devices)


@pytest.mark.skipif(shutil.which(CONTROL) is None or not list(Path("/dev").glob("nvidia[0-9]*")),
                    reason=f"needs an NVIDIA GPU and {CONTROL}; this host has neither")
def test_daemon_starts_and_answers(tmp_path: Path):
    daemon = start_mps(tmp_path)
    try:
        assert daemon.control("get_server_list") is not None
        assert set(daemon.environment()) == {"CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"}
    finally:
        daemon.stop()


@pytest.mark.skipif(shutil.which(CONTROL) is not None and bool(list(Path("/dev").glob("nvidia[0-9]*"))),
                    reason="this host could run MPS; the refusal is for hosts that cannot")
def test_bench_refuses_mps_where_it_cannot_run_before_doing_any_work(capsys: pytest.CaptureFixture[str]):
    from bench import run

    assert run.main(["--mps", "--out", "/nonexistent/never-written"]) == 2
    assert "--mps:" in capsys.readouterr().err


def test_start_waits_for_a_quitting_daemon_of_the_same_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The real control binary refuses `-d` while a daemon told to quit still has clients; stand in for it with a
    script that refuses twice, then starts (a stand-in: this host has no GPU driver)."""
    devices, tools = tmp_path / "dev", tmp_path / "bin"
    devices.mkdir(), tools.mkdir()
    (devices / "nvidia0").touch()
    attempts = tmp_path / "attempts"
    control = tools / CONTROL
    control.write_text(f'#!/bin/sh\necho x >> "{attempts}"\n'
                       f'[ "$(wc -l < "{attempts}")" -ge 3 ] && exit 0\n'
                       'echo "An instance of this daemon is already running" >&2; exit 1\n')
    control.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    daemon = start_mps(tmp_path / "mps", device_folder=devices, wait_s=10.0)
    assert daemon.pipe_folder == tmp_path / "mps" / "pipe"
    assert len(attempts.read_text().splitlines()) == 3
    attempts.unlink()
    control.write_text('#!/bin/sh\necho "An instance of this daemon is already running" >&2; exit 1\n')
    with pytest.raises(MpsUnavailable, match="already running"):
        start_mps(tmp_path / "mps", device_folder=devices, wait_s=1.0)


def _stand_in_daemon(tmp_path: Path, pipe_folder: str) -> subprocess.Popen:
    """A process that looks like a control daemon from /proc (its program named like the real one, the pipe folder in
    its environment): a copy of `sleep`. This host has no GPU driver."""
    program = tmp_path / "daemon" / CONTROL
    program.parent.mkdir(exist_ok=True)
    shutil.copy(shutil.which("sleep"), program)
    process = subprocess.Popen([str(program), "60"], env={"CUDA_MPS_PIPE_DIRECTORY": pipe_folder})
    # /proc can show the parent's command line for a moment after Popen returns (seen here): wait for the exec.
    deadline = time.monotonic() + 10.0
    while CONTROL.encode() not in Path(f"/proc/{process.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    return process


def test_running_daemons_are_found_with_their_pipe_folders(tmp_path: Path):
    from facefuse.mps import running_daemons

    daemon = _stand_in_daemon(tmp_path, str(tmp_path / "pipe"))
    try:
        assert (daemon.pid, str(tmp_path / "pipe")) in running_daemons()
    finally:
        daemon.kill()
        daemon.wait()
    assert all(pid != daemon.pid for pid, _ in running_daemons())


def test_a_refused_start_names_the_daemon_in_the_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    devices, tools = tmp_path / "dev", tmp_path / "bin"
    devices.mkdir(), tools.mkdir()
    (devices / "nvidia0").touch()
    control = tools / CONTROL
    control.write_text('#!/bin/sh\necho "An instance of this daemon is already running" >&2; exit 1\n')
    control.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    other = _stand_in_daemon(tmp_path, "/tmp/elsewhere-mps")
    try:
        with pytest.raises(MpsUnavailable, match=rf"pid {other.pid} \(pipe folder /tmp/elsewhere-mps\).*echo quit"):
            start_mps(tmp_path / "mps", device_folder=devices, wait_s=0.5)
    finally:
        other.kill()
        other.wait()


def test_stop_waits_until_the_daemon_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`quit` ends the daemon a moment later (here: the stand-in control kills the stand-in daemon after 1 s);
    stop returns once it is gone, and says so; with the daemon staying, it gives up after its wait."""
    from facefuse.mps import MpsDaemon

    daemon_folder = tmp_path / "mps" / "pipe"
    stand_in = _stand_in_daemon(tmp_path, str(daemon_folder))
    tools = tmp_path / "bin"
    tools.mkdir()
    control = tools / CONTROL
    control.write_text(f'#!/bin/sh\n(sleep 1; kill {stand_in.pid}) >/dev/null 2>&1 &\nexit 0\n')
    control.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    reaper = threading.Thread(target=stand_in.wait)  # reap it, so /proc forgets it once killed
    reaper.start()
    daemon = MpsDaemon(daemon_folder, tmp_path / "mps" / "log")
    started = time.monotonic()
    assert daemon.stop(wait_s=20.0) is True
    assert 0.5 < time.monotonic() - started < 15.0
    reaper.join(timeout=10)
    stubborn = _stand_in_daemon(tmp_path, str(daemon_folder))
    control.write_text("#!/bin/sh\nexit 0\n")
    try:
        assert daemon.stop(wait_s=0.5) is False
    finally:
        stubborn.kill()
        stubborn.wait()

"""facefuse/mps.py: MPS is refused with a reason where it cannot run, and really starts where it can."""

from __future__ import annotations

import shutil
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

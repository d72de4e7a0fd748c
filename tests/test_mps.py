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

"""bench.stub_profile: py-spy's collapsed stacks summarised per model, and a real profile of the live server."""

from __future__ import annotations

import threading

import pytest

from bench.stub_profile import ModelProfile, StubProfiler, find_py_spy
from client.api import FusionClient

RAW = """\
<module> (model.py:1);TritonPythonModel.execute (model.py:104);guarded (facefuse/triton_glue.py:55);\
TritonPythonModel._execute (model.py:118);Preprocessor.prepare_batch (facefuse/pipeline.py:220);\
FaceDetector.detect_batch (facefuse/detection.py:562);BucketedNet.__call__ (facefuse/batch_buckets.py:69) 30
<module> (model.py:1);TritonPythonModel.execute (model.py:104);guarded (facefuse/triton_glue.py:55);\
TritonPythonModel._execute (model.py:118);Preprocessor.prepare_batch (facefuse/pipeline.py:199);\
Preprocessor._decode (facefuse/pipeline.py:243) 10
<module> (model.py:1);TritonPythonModel.execute (model.py:104) 5
<module> (model.py:1);poll (stub.py:7) 5
not a stack line
"""


def test_samples_are_grouped_by_what_execute_called():
    profile = ModelProfile("preprocess")
    profile.add_raw(RAW)
    assert profile.samples == 50
    detect = ("Preprocessor.prepare_batch [facefuse/pipeline.py:220] > "
              "FaceDetector.detect_batch [facefuse/detection.py:562]")
    assert profile.calls[detect] == 30  # the wrapper frames (guarded, _execute) are skipped
    assert profile.calls["Preprocessor.prepare_batch [facefuse/pipeline.py:199] > "
                         "Preprocessor._decode [facefuse/pipeline.py:243]"] == 10
    assert profile.calls["(execute itself)"] == 5
    assert profile.calls["(outside execute) <module> [model.py:1] > poll [stub.py:7]"] == 5
    report = profile.report(seconds=1.0, rate=100)
    assert report.splitlines()[0] == "preprocess: 50 busy samples = 0.50 Python threads busy over 1 s"
    assert report.splitlines()[1] == f"   60.0%  {detect}"


@pytest.mark.skipif(find_py_spy() is None, reason="py-spy is not installed (requirements.txt pins it)")
def test_profile_of_the_live_server_names_each_models_work(triton_server, hanks_png, group_jpg):
    """py-spy on the real server's stubs while requests run: each model's busy samples land under its execute."""
    profiler = StubProfiler(triton_server["process"].pid, seconds=6, folder=triton_server["log"].parent / "py-spy")
    stop = threading.Event()

    def traffic() -> None:
        with FusionClient(f"127.0.0.1:{triton_server['ports'].grpc}", protocol="grpc") as client:
            while not stop.is_set():
                client.fuse(hanks_png, group_jpg, 100, 100)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        report = profiler.finish()
    finally:
        stop.set()
        worker.join()
    if "py-spy wrote nothing" in report and "ermission" in report:
        pytest.skip(f"py-spy may not attach to processes here (ptrace): {report.strip()[-200:]}")
    for model, work in (("preprocess", "prepare_batch"), ("postprocess", "finish"), ("fusion", "run")):
        section = next(part for part in report.split("\n\n") if part.startswith(f"{model}:"))
        assert work in section, section


def _fake_py_spy(tmp_path, monkeypatch, fail_first: bool) -> None:
    """A stand-in py-spy that writes 7 samples under execute (failing its first start when asked) and a stand-in
    stub list of one fusion instance."""
    from bench import stub_profile
    from facefuse.procfs import Stub

    marker = tmp_path / "started-once"
    if not fail_first:
        marker.touch()
    fake = tmp_path / "py-spy"
    fake.write_text("\n".join([
        "#!/bin/sh",
        f'if [ ! -e "{marker}" ]; then touch "{marker}"; echo "Failed to find python version" >&2; exit 1; fi',
        'out=""; while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done',
        'printf "a (m.py:1);TritonPythonModel.execute (m.py:2);work (w.py:3) 7\\n" > "$out"', ""]))
    fake.chmod(0o755)
    monkeypatch.setattr(stub_profile, "find_py_spy", lambda: str(fake))
    monkeypatch.setattr(stub_profile, "stub_processes", lambda pid: {"fusion_0_0": Stub(1, "fusion", "fusion_0_0")})


def test_wall_coverage_compares_py_spys_samples_with_tritons_compute_time(tmp_path, monkeypatch):
    _fake_py_spy(tmp_path, monkeypatch, fail_first=False)
    profiler = StubProfiler(server_pid=0, seconds=1, folder=tmp_path / "raw", rate=7, wall=True)
    assert profiler.finish().startswith("fusion: 7 samples in execute")
    # 10 requests/s in batches of 2 at 100 ms each: 0.5 threads in execute; py-spy saw 7 samples at 7/s in 1 s.
    figures = {"throughput_per_s": 10.0, "fusion_batch": 2.0, "fusion_infer_ms": 100.0}
    assert profiler.coverage(figures) == [
        "fusion: py-spy saw 1.00 threads in execute, Triton's compute times imply 0.50 (200%)"]
    assert profiler.coverage({"throughput_per_s": 10.0}) == []  # no compute time for the model: nothing to say


def test_a_py_spy_that_fails_at_once_is_started_again(tmp_path, monkeypatch):
    """Stand-ins for py-spy (a script that fails on its first start) and for the server's stub list: the retry
    logic is what is under test; the live test above runs the real py-spy on the real server."""
    _fake_py_spy(tmp_path, monkeypatch, fail_first=True)
    report = StubProfiler(server_pid=0, seconds=1, folder=tmp_path / "raw", rate=7).finish()
    assert report.startswith("fusion: 7 busy samples")
    assert "100.0%  work [w.py:3]" in report


def test_wall_profile_counts_only_samples_inside_execute():
    profile = ModelProfile("preprocess", wall=True)
    profile.add_raw(RAW)
    assert profile.samples == 45  # the thread polling outside execute is waiting for work, not serving
    assert not any(call.startswith("(outside execute)") for call in profile.calls)
    # three frames deep: what detect_batch called
    assert profile.calls["Preprocessor.prepare_batch [facefuse/pipeline.py:220] > "
                         "FaceDetector.detect_batch [facefuse/detection.py:562] > "
                         "BucketedNet.__call__ [facefuse/batch_buckets.py:69]"] == 30
    assert profile.report(seconds=1.0, rate=100).splitlines()[0] == (
        "preprocess: 45 samples in execute (idle included) = 0.45 threads in execute over 1 s")

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

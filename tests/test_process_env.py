"""The model processes' thread environment (facefuse/process_env.py): no math thread left spinning between calls."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A model instance's life in small: numpy's small solves between waits, as per request; then the CPU each thread
# other than the main one used per second of wall time.
_WORKLOAD = """
import json, os, sys, time
from facefuse.process_env import cap_math_threads
cap_math_threads()
import numpy as np
from facefuse import procfs
matrix, right = np.random.rand(165, 165), np.random.rand(165, 4)
before, started = procfs.thread_cpu_seconds(os.getpid()), time.monotonic()
for _ in range(20):
    np.linalg.solve(matrix, right)
    matrix @ matrix
    time.sleep(0.05)
after, elapsed = procfs.thread_cpu_seconds(os.getpid()), time.monotonic() - started
others = sum(seconds - before.get(name, 0.0) for name, seconds in after.items() if name != "main")
print(json.dumps({"other_cores": others / elapsed, "openblas": os.environ["OPENBLAS_NUM_THREADS"]}))
"""


def _other_threads_cores(preset: dict[str, str]) -> dict:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    environment.update(preset, PYTHONPATH=str(REPO))
    finished = subprocess.run([sys.executable, "-c", _WORKLOAD], env=environment, capture_output=True, text=True,
                              timeout=120, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread CPU is read from /proc (Linux)")
def test_no_blas_thread_spins_between_a_requests_small_solves():
    capped = _other_threads_cores({})
    assert capped["openblas"] == "1"
    assert capped["other_cores"] < 0.15, capped
    # The measurement sees the spinning when OpenBLAS keeps a worker (what the models had: 2 threads).
    spinning = _other_threads_cores({"OPENBLAS_NUM_THREADS": "2"})
    assert spinning["openblas"] == "2"  # a value the environment sets is kept
    assert spinning["other_cores"] > 0.3, spinning


@pytest.mark.parametrize("model", ["preprocess", "fusion", "postprocess"])
def test_each_model_sets_its_process_defaults_before_numpy_torch_and_opencv_load(model):
    """The pools are sized when the libraries load: the call must come first (triton_python_backend_utils imports
    numpy too)."""
    tree = ast.parse((REPO / "model_repository" / model / "1" / "model.py").read_text())
    statements = list(tree.body)
    cap = next(index for index, node in enumerate(statements) if isinstance(node, ast.Expr)
               and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "set_process_defaults")

    def heavy(node: ast.stmt) -> bool:
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        return any(name.split(".")[0] in {"numpy", "torch", "cv2", "triton_python_backend_utils"} or
                   (name.startswith("facefuse.") and name != "facefuse.process_env") for name in names)

    assert not any(heavy(node) for node in statements[:cap])
    assert any(heavy(node) for node in statements[cap:])


def test_process_defaults_choose_the_cuda_allocator_unless_the_environment_does():
    """torch reads PYTORCH_CUDA_ALLOC_CONF at its first CUDA allocation: the models set it first; an operator's own
    value is kept."""
    code = ("import json, os; from facefuse.process_env import set_process_defaults; set_process_defaults(); "
            "print(json.dumps([os.environ['PYTORCH_CUDA_ALLOC_CONF'], os.environ['OPENBLAS_NUM_THREADS']]))")

    def run(preset: dict[str, str]) -> list[str]:
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("PYTORCH_CUDA_ALLOC_CONF", "OPENBLAS_NUM_THREADS")}
        environment.update(preset, PYTHONPATH=str(REPO))
        finished = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                                  timeout=60, check=True)
        return json.loads(finished.stdout)

    assert run({}) == ["expandable_segments:True", "1"]
    assert run({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"})[0] == "max_split_size_mb:128"


# A stand-in for the CUDA driver's four calls that set_cuda_sync makes (this host has no GPU): two devices, and the
# flags each primary context was given, read back through `flags_of`.
_DRIVER_STAND_IN = r"""
static unsigned int flags[2] = {99, 99};
static int initialised = 0;
int cuInit(unsigned int f) { initialised = 1; return 0; }
int cuDeviceGetCount(int *count) { *count = initialised ? 2 : 0; return initialised ? 0 : 3; }
int cuDeviceGet(int *device, int ordinal) { *device = ordinal; return 0; }
int cuDevicePrimaryCtxSetFlags(int device, unsigned int f) { flags[device] = f; return 0; }
unsigned int flags_of(int device) { return flags[device]; }
"""


@pytest.fixture(scope="module")
def driver_stand_in(tmp_path_factory) -> Path:
    import shutil

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the CUDA driver stand-in")
    folder = tmp_path_factory.mktemp("driver")
    (folder / "driver.c").write_text(_DRIVER_STAND_IN)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(folder / "libcuda_stand_in.so"), str(folder / "driver.c")],
                   check=True)
    return folder / "libcuda_stand_in.so"


def test_cuda_sync_blocking_sets_every_gpus_primary_context(driver_stand_in):
    import ctypes

    from facefuse.process_env import CUDA_SYNC_FLAGS, set_cuda_sync

    assert set_cuda_sync("blocking", library=str(driver_stand_in)) == "blocking: set on 2 GPU(s)"
    driver = ctypes.CDLL(str(driver_stand_in))
    assert [driver.flags_of(0), driver.flags_of(1)] == [CUDA_SYNC_FLAGS["blocking"]] * 2 == [4, 4]
    assert set_cuda_sync(" Spin ", library=str(driver_stand_in)) == "spin: set on 2 GPU(s)"
    assert [driver.flags_of(0), driver.flags_of(1)] == [1, 1]


def test_cuda_sync_auto_touches_nothing_and_bad_values_are_refused(driver_stand_in, monkeypatch):
    import ctypes

    from facefuse.process_env import CUDA_SYNC_VARIABLE, set_cuda_sync

    driver = ctypes.CDLL(str(driver_stand_in))
    before = [driver.flags_of(0), driver.flags_of(1)]
    monkeypatch.delenv(CUDA_SYNC_VARIABLE, raising=False)
    assert set_cuda_sync(library=str(driver_stand_in)).startswith("auto")
    assert [driver.flags_of(0), driver.flags_of(1)] == before
    monkeypatch.setenv(CUDA_SYNC_VARIABLE, "sleepy")
    with pytest.raises(ValueError, match="FACEFUSE_CUDA_SYNC='sleepy': expected one of auto, spin, yield, blocking"):
        set_cuda_sync(library=str(driver_stand_in))
    assert set_cuda_sync("blocking", library="libcuda-that-is-not-here.so") == (
        "blocking: not set, no CUDA driver (libcuda-that-is-not-here.so)")

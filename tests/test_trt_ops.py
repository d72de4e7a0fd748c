"""The TensorRT operator check and the TensorRT build script, on a machine without TensorRT.

The build path is exercised end to end with a stand-in ``trtexec`` (a small script that records its arguments and
writes a fake engine), so the command line, atomic write and error reporting are tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from build import tensorrt as trt_build
from build import trt_ops

ROOT = Path(__file__).resolve().parents[1]


def tensor(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def tiny_model(nodes: list, inputs: list, outputs: list, functions: list | None = None, opset: int = 17):
    graph = helper.make_graph(nodes, "tiny", inputs, outputs)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.example", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=functions or [])


def two_input_model() -> onnx.ModelProto:
    """Inputs X [batch,3,4,4] and Y [batch,1]; only supported ops."""
    nodes = [helper.make_node("Relu", ["X"], ["A"]), helper.make_node("Identity", ["Y"], ["B"])]
    return tiny_model(
        nodes, [tensor("X", ["batch", 3, 4, 4]), tensor("Y", ["batch", 1])],
        [tensor("A", ["batch", 3, 4, 4]), tensor("B", ["batch", 1])],
    )


# ---------------------------------------------------------------------------------------------------------------
# unsupported_ops


def test_supported_and_unsupported_ops_are_told_apart() -> None:
    nodes = [
        helper.make_node("Relu", ["X"], ["A"]),
        helper.make_node("Unique", ["A"], ["U"]),
        helper.make_node("Unique", ["X"], ["V"]),
        helper.make_node("FaceMagic", ["A"], ["M"], domain="com.example"),
    ]
    model = tiny_model(nodes, [tensor("X", [4])], [tensor("U", [None]), tensor("V", [None]), tensor("M", [4])])
    assert trt_ops.unsupported_ops(model) == {"Unique": 2, "com.example::FaceMagic": 1}


def test_all_supported_graph_reports_nothing() -> None:
    assert trt_ops.unsupported_ops(two_input_model()) == {}


def test_ops_inside_subgraphs_are_counted() -> None:
    then_branch = helper.make_graph([helper.make_node("Unique", ["X"], ["T"])], "then", [], [tensor("T", [None])])
    else_branch = helper.make_graph([helper.make_node("Relu", ["X"], ["E"])], "else", [], [tensor("E", [4])])
    condition = helper.make_tensor_value_info("C", TensorProto.BOOL, [])
    node = helper.make_node("If", ["C"], ["Y"], then_branch=then_branch, else_branch=else_branch)
    model = tiny_model([node], [condition, tensor("X", [4])], [tensor("Y", [None])])
    assert trt_ops.unsupported_ops(model) == {"Unique": 1}
    assert trt_ops.op_counts(model) == {"If": 1, "Unique": 1, "Relu": 1}


def test_model_local_functions_are_inlined() -> None:
    fine = helper.make_function("com.example", "Fine", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])],
                                [helper.make_opsetid("", 17)])
    bad = helper.make_function("com.example", "Bad", ["x"], ["y"], [helper.make_node("Unique", ["x"], ["y"])],
                               [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Fine", ["X"], ["A"], domain="com.example"),
             helper.make_node("Bad", ["A"], ["B"], domain="com.example")]
    model = tiny_model(nodes, [tensor("X", [4])], [tensor("B", [None])], functions=[fine, bad])
    assert trt_ops.unsupported_ops(model) == {"Unique": 1}


@pytest.mark.filterwarnings("ignore")  # tracer chatter from torch.onnx, not ours
def test_torch_export_of_a_small_network_is_supported(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class Small(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.norm = torch.nn.InstanceNorm2d(4, affine=True)

        def forward(self, x, degree):
            y = torch.nn.functional.leaky_relu(self.norm(self.conv(x)), 0.2)
            y = torch.nn.functional.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
            return torch.sigmoid(y.mean(dim=1, keepdim=True)) * degree[:, :, None, None]

    path = tmp_path / "small.onnx"
    torch.onnx.export(
        Small().eval(), (torch.rand(2, 3, 8, 8), torch.rand(2, 1)), str(path), input_names=["X", "D"],
        output_names=["Y"], dynamic_axes={"X": {0: "batch"}, "D": {0: "batch"}, "Y": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    model = onnx.load(str(path))
    assert trt_ops.unsupported_ops(model) == {}
    assert "Resize" in trt_ops.restricted_ops(model)
    assert trt_build.onnx_input_dims(model) == {"X": (3, 8, 8), "D": (1,)}


def test_opset_range() -> None:
    assert trt_ops.opset_problem(two_input_model()) is None
    newer = tiny_model([helper.make_node("Relu", ["X"], ["Y"])], [tensor("X", [4])], [tensor("Y", [4])], opset=23)
    assert "23" in trt_ops.opset_problem(newer)


def test_trt_ops_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(two_input_model(), str(good))
    onnx.save(tiny_model([helper.make_node("Unique", ["X"], ["Y"])], [tensor("X", [4])], [tensor("Y", [None])]),
              str(bad))
    assert trt_ops.main([str(good)]) == 0
    assert trt_ops.main([str(bad)]) == 1
    assert "Unique x1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Shapes and commands


def test_input_dims_and_profiles() -> None:
    dims = trt_build.onnx_input_dims(two_input_model())
    assert dims == {"X": (3, 4, 4), "Y": (1,)}
    profiles = trt_build.shape_profiles(dims, 1, 8, 32)
    assert profiles["X"] == ((1, 3, 4, 4), (8, 3, 4, 4), (32, 3, 4, 4))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        trt_build.shape_profiles(dims, 4, 2, 32)


def test_fixed_batch_or_dynamic_feature_axis_is_refused() -> None:
    fixed = tiny_model([helper.make_node("Relu", ["X"], ["Y"])], [tensor("X", [1, 3])], [tensor("Y", [1, 3])])
    with pytest.raises(ValueError, match="fixed batch dimension"):
        trt_build.onnx_input_dims(fixed)
    loose = tiny_model([helper.make_node("Relu", ["X"], ["Y"])], [tensor("X", ["b", "w"])], [tensor("Y", ["b", "w"])])
    with pytest.raises(ValueError, match="axis 1 is dynamic"):
        trt_build.onnx_input_dims(loose)


def test_docker_build_command() -> None:
    command = trt_build.docker_build_command(ROOT)
    image_at = command.index("nvcr.io/nvidia/tensorrt:24.10-py3")
    assert command[:5] == ["docker", "run", "--rm", "--gpus", "all"]
    assert command[command.index("-v") + 1] == f"{ROOT}:/workspace"
    container = command[image_at + 1 :]
    assert container[0] == "trtexec"
    assert "--onnx=/workspace/model_repository/fusion/1/model.onnx" in container
    assert "--saveEngine=/workspace/model_repository/fusion/1/model.plan" in container
    assert "--fp16" in container and "--skipInference" in container
    assert "--memPoolSize=workspace:4096" in container
    shapes = dict(arg.split("=", 1) for arg in container if arg.startswith(("--minShapes=", "--optShapes=",
                                                                            "--maxShapes=")))
    from facefuse.network import INPUT_SHAPES

    expected_min = ",".join(f"{name}:{'x'.join(map(str, (1, *shape)))}" for name, shape in INPUT_SHAPES.items())
    assert shapes["--minShapes"] == expected_min
    assert shapes["--maxShapes"] == "CROPS:32x2x3x256x256,GEOMETRY:32x1130"
    assert "--int8" not in container
    int8 = trt_build.docker_build_command(ROOT, int8=True, calibration_cache="calib/fusion.cache")
    assert "--int8" in int8 and "--calib=/workspace/calib/fusion.cache" in int8


def test_trt_version_decoding() -> None:
    assert trt_build._decode_trt_version(100500) == "10.5.0"
    assert trt_build._decode_trt_version(100001) == "10.0.1"
    assert trt_build._decode_trt_version(8601) == "8.6.1"


# ---------------------------------------------------------------------------------------------------------------
# Detection and the CLI without TensorRT

TENSORRT_HERE = (
    importlib.util.find_spec("tensorrt") is not None
    or shutil.which("trtexec") is not None
    or trt_build.TRTEXEC_FALLBACK.exists()
)


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hide every TensorRT this machine might have: no module, nothing on PATH, no fallback trtexec."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(trt_build, "TRTEXEC_FALLBACK", tmp_path / "no-such-trtexec")
    return empty


@pytest.mark.skipif(TENSORRT_HERE, reason="this machine has TensorRT")
def test_find_tensorrt_finds_nothing_here() -> None:
    assert trt_build.find_tensorrt() is None


def test_find_tensorrt_with_everything_hidden(no_tensorrt: Path) -> None:
    assert trt_build.find_tensorrt() is None


def test_find_tensorrt_picks_trtexec_on_path(no_tensorrt: Path) -> None:
    fake = no_tensorrt / "trtexec"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    tool = trt_build.find_tensorrt()
    assert tool is not None and tool.kind == "trtexec" and tool.trtexec == fake


def test_cli_notice_without_tensorrt(no_tensorrt: Path, capsys: pytest.CaptureFixture) -> None:
    assert trt_build.main(["--docker", "never"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [trt_build.not_found_notice()]
    assert out.startswith("TensorRT: not found (no tensorrt module, no trtexec); fusion will be served by the "
                          "fallback runtime")


def test_cli_require_fails_without_tensorrt(no_tensorrt: Path, capsys: pytest.CaptureFixture,
                                            tmp_path: Path) -> None:
    status = tmp_path / "status"
    assert trt_build.main(["--docker", "never", "--require", "--status-file", str(status)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == [trt_build.not_found_notice()]
    assert status.read_text().strip() == "missing"


@pytest.mark.skipif(TENSORRT_HERE, reason="this machine has TensorRT")
@pytest.mark.parametrize(("extra", "code"), [([], 0), (["--require"], 2)])
def test_cli_as_a_module(extra: list[str], code: int) -> None:
    """`python -m build.tensorrt` the way the Makefile runs it (docker auto-detection included)."""
    result = subprocess.run(
        [sys.executable, "-m", "build.tensorrt", *extra], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    if trt_build.docker_gpu_available():
        pytest.skip("docker with an NVIDIA runtime is available; the CLI would build in docker")
    assert result.returncode == code, result.stderr
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith("TensorRT: not found (no tensorrt module, no trtexec")


def test_build_plan_without_tensorrt_raises(no_tensorrt: Path, tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    onnx.save(two_input_model(), str(onnx_path))
    with pytest.raises(trt_build.TensorRTNotFound, match="not found"):
        trt_build.build_plan(onnx_path, tmp_path / "model.plan", log=lambda line: None)


# ---------------------------------------------------------------------------------------------------------------
# The trtexec path with a stand-in trtexec

FAKE_TRTEXEC = """#!{python}
import sys
from pathlib import Path
args = sys.argv[1:]
Path({record!r}).write_text("\\n".join(args))
print("&&&& RUNNING TensorRT.trtexec [TensorRT v100500] # trtexec " + " ".join(args), flush=True)
if {fail!r}:
    print("[E] Error[4]: fake failure", flush=True)
    print("&&&& FAILED TensorRT.trtexec", flush=True)
    sys.exit(1)
engine = next(arg.split("=", 1)[1] for arg in args if arg.startswith("--saveEngine="))
Path(engine).write_bytes(b"fake engine")
print("[I] Engine built in 0.1 sec.", flush=True)
print("&&&& PASSED TensorRT.trtexec", flush=True)
"""


def fake_trtexec(directory: Path, fail: bool = False) -> tuple[trt_build.TensorRTTool, Path]:
    record = directory / "trtexec-args.txt"
    script = directory / "trtexec"
    script.write_text(FAKE_TRTEXEC.format(python=sys.executable, record=str(record), fail=fail))
    script.chmod(0o755)
    return trt_build.TensorRTTool("trtexec", None, script), record


@pytest.mark.skipif(os.name != "posix", reason="the stand-in trtexec is a script with a shebang")
def test_build_plan_with_trtexec(tmp_path: Path) -> None:
    tool, record = fake_trtexec(tmp_path)
    onnx_path, plan_path, cache = tmp_path / "model.onnx", tmp_path / "1" / "model.plan", tmp_path / "t.timing"
    onnx.save(two_input_model(), str(onnx_path))
    lines: list[str] = []
    assert trt_build.build_plan(onnx_path, plan_path, tool=tool, timing_cache=cache, log=lines.append) == plan_path
    assert plan_path.read_bytes() == b"fake engine"
    assert not list(plan_path.parent.glob("*.partial*")), "the temporary engine must be moved into place"
    args = record.read_text().splitlines()
    assert f"--onnx={onnx_path}" in args and "--fp16" in args and f"--timingCacheFile={cache}" in args
    assert "--minShapes=X:1x3x4x4,Y:1x1" in args
    assert "--optShapes=X:8x3x4x4,Y:8x1" in args
    assert "--maxShapes=X:32x3x4x4,Y:32x1" in args
    assert any("PASSED" in line for line in lines)
    assert not any("warning" in line for line in lines), "TensorRT 10.5 matches NGC 24.10; no version warning"


@pytest.mark.skipif(os.name != "posix", reason="the stand-in trtexec is a script with a shebang")
def test_build_plan_failure_is_explained(tmp_path: Path) -> None:
    tool, _ = fake_trtexec(tmp_path, fail=True)
    onnx_path, plan_path = tmp_path / "model.onnx", tmp_path / "model.plan"
    onnx.save(two_input_model(), str(onnx_path))
    with pytest.raises(trt_build.TensorRTBuildError, match="status 1(.|\n)*fake failure"):
        trt_build.build_plan(onnx_path, plan_path, tool=tool, timing_cache=tmp_path / "t.timing",
                             log=lambda line: None)
    assert not plan_path.exists() and not list(tmp_path.glob("*.partial*"))


def test_build_plan_refuses_unsupported_ops_before_building(tmp_path: Path) -> None:
    tool, record = fake_trtexec(tmp_path)
    onnx_path = tmp_path / "model.onnx"
    model = tiny_model([helper.make_node("Unique", ["X"], ["Y"])], [tensor("X", ["batch", 4])],
                       [tensor("Y", [None])])
    onnx.save(model, str(onnx_path))
    with pytest.raises(trt_build.TensorRTBuildError, match="Unique x1"):
        trt_build.build_plan(onnx_path, tmp_path / "model.plan", tool=tool, log=lambda line: None)
    assert not record.exists(), "trtexec must not run on a graph that cannot parse"


def test_int8_without_scales_is_refused(tmp_path: Path) -> None:
    tool, _ = fake_trtexec(tmp_path)
    onnx_path = tmp_path / "model.onnx"
    onnx.save(two_input_model(), str(onnx_path))
    with pytest.raises(ValueError, match="explicitly quantized"):
        trt_build.build_plan(onnx_path, tmp_path / "model.plan", int8=True, tool=tool, log=lambda line: None)


# ---------------------------------------------------------------------------------------------------------------
# The Python-API path with a stand-in `tensorrt` module (the calls TensorRT 10's Python API documents)


def fake_tensorrt_module(version: str, *, fail: bool = False) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: dict = {"profiles": {}, "flags": set()}
    trt.calls = calls

    class ILogger:
        def __init__(self) -> None:
            pass

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    class Memory(bytes):
        pass

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> Memory:
            return Memory(self.data + b"+tuned")

    class Config:
        def set_memory_pool_limit(self, pool, size) -> None:
            calls["workspace"] = size

        def set_flag(self, flag) -> None:
            calls["flags"].add(flag)

        def add_optimization_profile(self, profile) -> None:
            calls["profile_added"] = True

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            return self.cache

    class Profile:
        def set_shape(self, name, minimum, optimum, maximum) -> None:
            calls["profiles"][name] = (minimum, optimum, maximum)

    class Tensor:
        def __init__(self, name: str) -> None:
            self.name = name

    class Network:
        def __init__(self) -> None:
            self.inputs: list = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> Tensor:
            return self.inputs[index]

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network, config):
            monitor = getattr(config, "progress_monitor", None)
            if monitor is not None:
                monitor.phase_start("Building engine", None, 2)
                assert monitor.step_complete("Building engine", 0) is True
                monitor.phase_finish("Building engine")
            if fail:
                self.logger.log(1, "no kernel for layer /fuse/Conv")
                return None
            return Memory(b"python engine")

    class OnnxParser:
        def __init__(self, network: Network, logger) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            model = onnx.load(path)
            self.network.inputs = [Tensor(value.name) for value in model.graph.input]
            return True

    trt.ILogger, trt.IProgressMonitor, trt.Builder, trt.OnnxParser = ILogger, IProgressMonitor, Builder, OnnxParser
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16", INT8="int8")
    return trt


def test_build_plan_with_the_python_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    trt = fake_tensorrt_module("10.5.0.18")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    tool = trt_build.find_tensorrt()
    assert tool == trt_build.TensorRTTool("python", "10.5.0.18")
    onnx_path, plan_path, cache = tmp_path / "model.onnx", tmp_path / "model.plan", tmp_path / "c.timing"
    onnx.save(two_input_model(), str(onnx_path))
    cache.write_bytes(b"old")
    lines: list[str] = []
    trt_build.build_plan(onnx_path, plan_path, tool=tool, timing_cache=cache, workspace_mib=512, log=lines.append)
    assert plan_path.read_bytes() == b"python engine"
    assert cache.read_bytes() == b"old+tuned", "the timing cache is read, then written back"
    assert trt.calls["profiles"]["X"] == ((1, 3, 4, 4), (8, 3, 4, 4), (32, 3, 4, 4))
    assert trt.calls["profiles"]["Y"] == ((1, 1), (8, 1), (32, 1))
    assert trt.calls["flags"] == {"fp16"} and trt.calls["workspace"] == 512 << 20
    assert any("Building engine (2 steps)" in line for line in lines)
    assert not any("warning" in line for line in lines)


def test_python_api_failure_and_version_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt_module("10.7.0", fail=True))
    onnx_path, plan_path = tmp_path / "model.onnx", tmp_path / "model.plan"
    onnx.save(two_input_model(), str(onnx_path))
    lines: list[str] = []
    with pytest.raises(trt_build.TensorRTBuildError, match="no kernel for layer"):
        trt_build.build_plan(onnx_path, plan_path, timing_cache=tmp_path / "c.timing", log=lines.append)
    assert not plan_path.exists()
    assert any("Triton 24.10 ships TensorRT 10.5" in line for line in lines), "a 10.7 engine won't load in 24.10"

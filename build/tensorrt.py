"""Build the fusion network's TensorRT plan (``model_repository/fusion/1/model.plan``) from its ONNX export.

A TensorRT engine only loads in the TensorRT version (and on the GPU model) that built it, so the plan for the
docker/GPU path is built with the TensorRT of the same NGC release as the Triton image: NGC 24.10 =
Triton 2.51.0 = TensorRT 10.5. Where to build, in order:
  1. the ``tensorrt`` Python module, if it imports (builder API, progress lines, timing cache);
  2. ``trtexec`` on PATH or at /usr/src/tensorrt/bin/trtexec;
  3. ``--docker auto|always``: trtexec inside nvcr.io/nvidia/tensorrt:<release>-py3 (needs docker + NVIDIA runtime);
  4. none of these: one notice line, exit 0, and fusion is served by the fallback runtime.

Usage:
  python -m build.tensorrt [--onnx model_repository/fusion/1/model.onnx] [--plan model_repository/fusion/1/model.plan]
                           [--no-fp16] [--int8 --calibration-cache FILE] [--docker never|auto|always] [--require]
  python -m build.tensorrt --print-docker-command

Exit status: 0 built, or TensorRT absent (stdout's line says which: "TensorRT: built ..." / "TensorRT: not found ...");
1 the build failed; 2 TensorRT absent and --require given.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import onnx

from build.trt_ops import TENSORRT_VERSION as PARSER_TABLE_VERSION
from build.trt_ops import unsupported_ops
from facefuse.network import INPUT_SHAPES

Log = Callable[[str], None]

NGC_RELEASE = "24.10"
# TensorRT major.minor inside nvcr.io/nvidia/{tritonserver,tensorrt}:<release>-py3 (NVIDIA container release notes).
NGC_TENSORRT: dict[str, str] = {"24.10": "10.5"}
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:{release}-py3"
TENSORRT_IMAGE = "nvcr.io/nvidia/tensorrt:{release}-py3"
TRTEXEC_FALLBACK = Path("/usr/src/tensorrt/bin/trtexec")  # where NGC containers and the .deb packages put it

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTAINER_ROOT = PurePosixPath("/workspace")
ONNX_RELPATH = PurePosixPath("model_repository/fusion/1/model.onnx")
PLAN_RELPATH = PurePosixPath("model_repository/fusion/1/model.plan")
TIMING_CACHE_RELDIR = PurePosixPath(".cache/tensorrt")  # git-ignored

# The fusion model's inputs without the batch axis (the wire contract of model_repository/fusion). The docker and
# compose commands are static, so they use this table; build_plan reads the shapes from the ONNX itself.
FUSION_INPUTS: dict[str, tuple[int, ...]] = dict(INPUT_SHAPES)
MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 8, 32  # max matches max_batch_size 32 in the fusion config
WORKSPACE_MIB = 4096

FALLBACK_RUNTIME = "fusion will be served by the fallback runtime (PyTorch CUDA / ONNX Runtime CPU)"


class TensorRTNotFound(RuntimeError):
    """No TensorRT builder is available on this machine."""


class TensorRTBuildError(RuntimeError):
    """TensorRT was found but could not build the engine; the message says why."""


@dataclass(frozen=True)
class TensorRTTool:
    """A way to build engines on this machine: the ``tensorrt`` Python module or a ``trtexec`` binary."""

    kind: str  # "python" or "trtexec"
    version: str | None  # "10.5.0" for the module; None for trtexec until a build prints it
    trtexec: Path | None = None

    def describe(self) -> str:
        if self.kind == "python":
            return f"TensorRT {self.version} (Python module)"
        return f"trtexec at {self.trtexec}" + (f" (TensorRT {self.version})" if self.version else "")


def not_found_notice(docker_checked: bool = False) -> str:
    """The one line printed when no TensorRT is available."""
    searched = "no tensorrt module, no trtexec" + (", no docker with an NVIDIA GPU runtime" if docker_checked else "")
    return f"TensorRT: not found ({searched}); {FALLBACK_RUNTIME}"


def find_tensorrt() -> TensorRTTool | None:
    """The first TensorRT builder found: the ``tensorrt`` module, then ``trtexec``; None when neither exists."""
    try:
        import tensorrt  # optional, heavy, and absent on most development machines
    except (ImportError, OSError):  # OSError: the wheel is there but libnvinfer is not loadable
        pass
    else:
        return TensorRTTool("python", str(getattr(tensorrt, "__version__", "unknown")))
    on_path = shutil.which("trtexec")
    if on_path:
        return TensorRTTool("trtexec", None, Path(on_path))
    if TRTEXEC_FALLBACK.is_file() and os.access(TRTEXEC_FALLBACK, os.X_OK):
        return TensorRTTool("trtexec", None, TRTEXEC_FALLBACK)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Shapes and the trtexec command line


def onnx_input_dims(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Per-sample dims (batch axis dropped) of every graph input, in graph order.

    Raises ValueError when an input's batch axis is fixed (the engine could not batch) or another axis is dynamic
    (the profile would be ambiguous): both are export bugs, better caught here than by a 10-minute build.
    """
    initializers = {initializer.name for initializer in model.graph.initializer}
    dims: dict[str, tuple[int, ...]] = {}
    for value in model.graph.input:
        if value.name in initializers:  # old exporters list weights as inputs too
            continue
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            raise ValueError(f"ONNX input {value.name!r} has no tensor shape")
        batch, *rest = value.type.tensor_type.shape.dim or [None]
        if batch is None:
            raise ValueError(f"ONNX input {value.name!r} is a scalar; every fusion input needs a batch axis")
        if batch.HasField("dim_value"):
            raise ValueError(
                f"ONNX input {value.name!r} has a fixed batch dimension ({batch.dim_value}); export it with a "
                f"dynamic batch axis (dynamic_axes={{{value.name!r}: {{0: 'batch'}}}})"
            )
        fixed = []
        for axis, dim in enumerate(rest, start=1):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                raise ValueError(
                    f"ONNX input {value.name!r} axis {axis} is dynamic ({dim.dim_param or '?'}); "
                    "only the batch axis may be dynamic"
                )
            fixed.append(dim.dim_value)
        dims[value.name] = tuple(fixed)
    if not dims:
        raise ValueError("the ONNX graph has no inputs")
    return dims


Profiles = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def shape_profiles(inputs: dict[str, tuple[int, ...]], min_batch: int, opt_batch: int, max_batch: int) -> Profiles:
    """name -> (min, opt, max) full shapes: the batch axis varies, every other axis is fixed."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    return {
        name: ((min_batch, *dims), (opt_batch, *dims), (max_batch, *dims)) for name, dims in inputs.items()
    }


def _shapes_arg(profiles: Profiles, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profiles.items())


def trtexec_args(
    onnx_path: str,
    plan_path: str,
    profiles: Profiles,
    *,
    fp16: bool = True,
    int8: bool = False,
    calibration_cache: str | None = None,
    timing_cache: str | None = None,
    workspace_mib: int = WORKSPACE_MIB,
    trtexec: str = "trtexec",
) -> list[str]:
    """The trtexec command (TensorRT 10 flags) that builds `plan_path` and runs no benchmark."""
    args = [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        f"--minShapes={_shapes_arg(profiles, 0)}",
        f"--optShapes={_shapes_arg(profiles, 1)}",
        f"--maxShapes={_shapes_arg(profiles, 2)}",
    ]
    if fp16:
        args.append("--fp16")
    if int8:
        # INT8 keeps --fp16 on (when asked) so layers without INT8 kernels fall back to FP16, not FP32.
        args.append("--int8")
        if calibration_cache:
            args.append(f"--calib={calibration_cache}")
    args.append(f"--memPoolSize=workspace:{workspace_mib}")  # MiB; TensorRT 10 removed --workspace
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")  # read if present, written back after the build
    args.append("--skipInference")  # build only; Triton and perf_analyzer do the measuring
    return args


def tensorrt_image(release: str = NGC_RELEASE) -> str:
    return TENSORRT_IMAGE.format(release=release)


def triton_image(release: str = NGC_RELEASE) -> str:
    return TRITON_IMAGE.format(release=release)


def docker_timing_cache(release: str = NGC_RELEASE) -> PurePosixPath:
    """Repository-relative timing cache for docker builds; named by release because caches don't cross versions."""
    return TIMING_CACHE_RELDIR / f"fusion-ngc{release}.timing"


def docker_build_command(
    repo_root: Path | str,
    release: str = NGC_RELEASE,
    *,
    onnx_relpath: PurePosixPath | str = ONNX_RELPATH,
    plan_relpath: PurePosixPath | str = PLAN_RELPATH,
    fp16: bool = True,
    int8: bool = False,
    calibration_cache: PurePosixPath | str | None = None,
    min_batch: int = MIN_BATCH,
    opt_batch: int = OPT_BATCH,
    max_batch: int = MAX_BATCH,
    workspace_mib: int = WORKSPACE_MIB,
) -> list[str]:
    """``docker run ... nvcr.io/nvidia/tensorrt:<release>-py3 trtexec ...`` building the plan from the ONNX.

    The repository is mounted at /workspace; paths are repository-relative. The compose service ``engine`` runs the
    same container command (tests/test_docker_compose.py keeps the two in step). ``.cache/tensorrt`` must exist
    before it runs (trtexec fails on a missing timing-cache directory); ``main`` and `build_plan_in_docker` make it.
    """
    root = Path(repo_root).resolve()
    profiles = shape_profiles(FUSION_INPUTS, min_batch, opt_batch, max_batch)
    container_args = trtexec_args(
        str(CONTAINER_ROOT / PurePosixPath(onnx_relpath)),
        str(CONTAINER_ROOT / PurePosixPath(plan_relpath)),
        profiles,
        fp16=fp16,
        int8=int8,
        calibration_cache=str(CONTAINER_ROOT / PurePosixPath(calibration_cache)) if calibration_cache else None,
        timing_cache=str(CONTAINER_ROOT / docker_timing_cache(release)),
        workspace_mib=workspace_mib,
    )
    command = ["docker", "run", "--rm", "--gpus", "all"]
    if hasattr(os, "getuid"):  # write model.plan as the invoking user, not root
        command += ["--user", f"{os.getuid()}:{os.getgid()}"]
    command += ["-v", f"{root}:{CONTAINER_ROOT}", "-w", str(CONTAINER_ROOT), tensorrt_image(release)]
    return command + container_args


def docker_gpu_available(timeout_s: float = 15.0) -> bool:
    """Whether a docker daemon answers and has the NVIDIA runtime registered (what ``--gpus`` needs)."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        info = subprocess.run(
            [docker, "info", "--format", "{{json .Runtimes}}"], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return info.returncode == 0 and "nvidia" in info.stdout


# ---------------------------------------------------------------------------------------------------------------
# Building


def _decode_trt_version(number: int) -> str:
    """trtexec prints ``[TensorRT v100500]``: 10.x packs as major*10000 + minor*100 + patch, 8.x as major*1000+..."""
    if number >= 100000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def _warn_if_mismatched(version: str | None, release: str, log: Log) -> None:
    expected = NGC_TENSORRT.get(release)
    if not version or not expected:
        return
    if ".".join(version.split(".")[:2]) != expected:
        log(
            f"[tensorrt] warning: this engine is built with TensorRT {version}, but Triton {release} ships TensorRT "
            f"{expected} and will refuse it; it is usable only by a runtime with TensorRT {version} (for the "
            f"docker path build with --docker always)"
        )


def _run_streaming(command: list[str], log: Log, prefix: str) -> tuple[int, list[str], str | None]:
    """Run `command`, logging its notable lines plus a heartbeat; return (status, last lines, TensorRT version)."""
    log(f"[tensorrt] $ {shlex.join(command)}")
    tail: deque[str] = deque(maxlen=40)
    version = None
    started = last_beat = time.perf_counter()
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    except OSError as error:
        raise TensorRTBuildError(f"could not start {command[0]}: {error}") from error
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.rstrip()
        tail.append(line)
        match = re.search(r"\[TensorRT v(\d+)\]", line)
        if match and version is None:
            version = _decode_trt_version(int(match.group(1)))
        # trtexec is verbose; pass on verdicts, warnings, errors and timings, and beat every 30 s otherwise.
        notable = line.startswith("&&&&") or "[E]" in line or "[W]" in line or "Engine built in" in line
        now = time.perf_counter()
        if notable:
            log(f"{prefix} {line}")
        elif now - last_beat >= 30.0:
            log(f"{prefix} ... still building ({now - started:.0f} s)")
            last_beat = now
    return process.wait(), list(tail), version


class _CacheCalibrator:
    """Factory for an INT8 calibrator that only replays a calibration cache (no calibration data here)."""

    @staticmethod
    def create(trt, cache: bytes):
        class CacheOnly(trt.IInt8EntropyCalibrator2):
            def __init__(self) -> None:
                trt.IInt8EntropyCalibrator2.__init__(self)

            def get_batch_size(self) -> int:
                return 1

            def get_batch(self, names):  # no data: TensorRT must take the scales from the cache
                return None

            def read_calibration_cache(self) -> bytes:
                return cache

            def write_calibration_cache(self, cache_bytes) -> None:
                return None

        return CacheOnly()


def _build_with_python(
    onnx_path: Path,
    out_path: Path,
    profiles: Profiles,
    *,
    fp16: bool,
    int8: bool,
    calibration_cache: Path | None,
    timing_cache: Path,
    workspace_mib: int,
    log: Log,
) -> str:
    import tensorrt as trt  # optional dependency, imported only when building

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            level = int(severity)  # 0 internal error, 1 error, 2 warning, 3 info, 4 verbose
            if level <= 1:
                self.errors.append(msg)
            if level <= 2:
                log(f"[tensorrt] {'error' if level <= 1 else 'warning'}: {msg}")

    class Progress(getattr(trt, "IProgressMonitor", object)):
        """Top-level phases as they start, plus a throttled step line; called from TensorRT's threads."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._last = 0.0

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            if parent_phase is None:
                log(f"[tensorrt] {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step) -> bool:
            with self._lock:
                now = time.perf_counter()
                if now - self._last >= 15.0:
                    self._last = now
                    log(f"[tensorrt]   {phase_name}: step {step + 1}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name) -> None:
            return None

    logger = Logger()
    try:
        builder = trt.Builder(logger)
    except (RuntimeError, TypeError) as error:  # pybind reports a null builder as TypeError
        raise TensorRTBuildError(f"TensorRT could not create a builder (is a CUDA GPU visible?): {error}") from error
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no detail given"
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        name = network.get_input(index).name
        if name not in profiles:
            raise TensorRTBuildError(f"TensorRT sees an input {name!r} that the ONNX graph inputs do not list")
        profile.set_shape(name, *profiles[name])
    config.add_optimization_profile(profile)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
        if calibration_cache is not None:  # implicit quantization (deprecated since 10.1) from a stored cache
            config.int8_calibrator = _CacheCalibrator.create(trt, calibration_cache.read_bytes())
            config.set_calibration_profile(profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"[tensorrt] timing cache {timing_cache} is from another GPU or TensorRT version; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    # The monitor must outlive the build; TensorRT before 10.0 has no progress interface.
    monitor = Progress() if hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-5:]) or "see the TensorRT messages above"
        raise TensorRTBuildError(f"TensorRT failed to build the engine: {detail}")
    out_path.write_bytes(memoryview(serialized))
    timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return str(trt.__version__)


def _build_with_trtexec(
    tool: TensorRTTool,
    onnx_path: Path,
    out_path: Path,
    profiles: Profiles,
    *,
    fp16: bool,
    int8: bool,
    calibration_cache: Path | None,
    timing_cache: Path,
    workspace_mib: int,
    log: Log,
) -> str | None:
    command = trtexec_args(
        str(onnx_path), str(out_path), profiles, fp16=fp16, int8=int8,
        calibration_cache=str(calibration_cache) if calibration_cache else None,
        timing_cache=str(timing_cache), workspace_mib=workspace_mib, trtexec=str(tool.trtexec),
    )
    status, tail, version = _run_streaming(command, log, "[trtexec]")
    if status != 0:
        raise TensorRTBuildError(f"trtexec exited with status {status}; its last lines:\n" + "\n".join(tail))
    return version


def _default_timing_cache(plan_path: Path, version: str | None) -> Path:
    tag = f"-trt{version}" if version else ""
    return REPO_ROOT / TIMING_CACHE_RELDIR / f"{plan_path.parent.parent.name or plan_path.stem}{tag}.timing"


def _uses_explicit_quantization(model: onnx.ModelProto) -> bool:
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)


def build_plan(
    onnx_path: Path | str,
    plan_path: Path | str,
    *,
    fp16: bool = True,
    int8: bool = False,
    min_batch: int = MIN_BATCH,
    opt_batch: int = OPT_BATCH,
    max_batch: int = MAX_BATCH,
    timing_cache: Path | str | None = None,
    workspace_mib: int = WORKSPACE_MIB,
    calibration_cache: Path | str | None = None,
    tool: TensorRTTool | None = None,
    release: str = NGC_RELEASE,
    log: Log = print,
) -> Path:
    """Build `plan_path` from `onnx_path` with a batch profile min/opt/max on every input; return `plan_path`.

    Input names and per-sample shapes come from the ONNX graph. The engine is written to a temporary name and moved
    into place only when complete, so a failed build never leaves a truncated plan for Triton to choke on.
    INT8 needs either an explicitly quantized (Q/DQ) graph or `calibration_cache` (implicit calibration is
    deprecated since TensorRT 10.1 and this project ships no calibration data loader).

    Raises TensorRTNotFound (no TensorRT), FileNotFoundError, ValueError (bad shapes or options) and
    TensorRTBuildError (unsupported ops, parser or builder failure), each with a sentence saying what to fix.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX model at {onnx_path}; run the ONNX export first")
    calibration_cache = Path(calibration_cache) if calibration_cache else None
    if calibration_cache is not None and not calibration_cache.is_file():
        raise FileNotFoundError(f"no INT8 calibration cache at {calibration_cache}")
    tool = tool or find_tensorrt()
    if tool is None:
        raise TensorRTNotFound(not_found_notice())

    model = onnx.load(str(onnx_path), load_external_data=False)
    profiles = shape_profiles(onnx_input_dims(model), min_batch, opt_batch, max_batch)
    missing = unsupported_ops(model)
    if missing:
        listed = ", ".join(f"{op} x{count}" for op, count in missing.items())
        raise TensorRTBuildError(
            f"{onnx_path} uses ops that TensorRT {PARSER_TABLE_VERSION}'s ONNX parser cannot import: {listed}"
        )
    if int8 and calibration_cache is None and not _uses_explicit_quantization(model):
        raise ValueError(
            "INT8 needs an explicitly quantized ONNX (QuantizeLinear/DequantizeLinear nodes) or --calibration-cache; "
            "TensorRT 10 deprecated implicit calibration, and without scales INT8 would be wrong, not just slow"
        )
    timing_cache = Path(timing_cache) if timing_cache else _default_timing_cache(plan_path, tool.version)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    partial = plan_path.with_name(plan_path.stem + ".partial" + plan_path.suffix)

    precision = "+".join(p for p, on in (("int8", int8), ("fp16", fp16), ("fp32", True)) if on)
    log(
        f"[tensorrt] building {plan_path} from {onnx_path} with {tool.describe()}: {precision}, batch "
        f"{min_batch}/{opt_batch}/{max_batch} on {len(profiles)} inputs, workspace {workspace_mib} MiB, "
        f"timing cache {timing_cache}"
    )
    _warn_if_mismatched(tool.version, release, log)
    started = time.perf_counter()
    options = dict(
        fp16=fp16, int8=int8, calibration_cache=calibration_cache, timing_cache=timing_cache,
        workspace_mib=workspace_mib, log=log,
    )
    try:
        if tool.kind == "python":
            version = _build_with_python(onnx_path, partial, profiles, **options)
        else:
            version = _build_with_trtexec(tool, onnx_path, partial, profiles, **options)
            _warn_if_mismatched(version, release, log)
        if not partial.is_file() or partial.stat().st_size == 0:
            raise TensorRTBuildError("TensorRT reported success but wrote no engine")
        os.replace(partial, plan_path)
    finally:
        partial.unlink(missing_ok=True)
    log(f"[tensorrt] wrote {plan_path} ({plan_path.stat().st_size / 2**20:.1f} MiB) "
        f"in {time.perf_counter() - started:.0f} s")
    return plan_path


def _repo_relative(path: Path, root: Path) -> PurePosixPath:
    try:
        return PurePosixPath(path.resolve().relative_to(root.resolve()).as_posix())
    except ValueError:
        raise ValueError(f"{path} is outside {root}; the docker build only sees the repository") from None


def build_plan_in_docker(
    repo_root: Path | str = REPO_ROOT,
    release: str = NGC_RELEASE,
    *,
    onnx_path: Path | str | None = None,
    plan_path: Path | str | None = None,
    log: Log = print,
    **options,
) -> Path:
    """Run `docker_build_command` (same options) and return the plan path; raises TensorRTBuildError on failure."""
    root = Path(repo_root).resolve()
    onnx_path = Path(onnx_path) if onnx_path else root / ONNX_RELPATH
    plan_path = Path(plan_path) if plan_path else root / PLAN_RELPATH
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX model at {onnx_path}; run the ONNX export first")
    model = onnx.load(str(onnx_path), load_external_data=False)
    # The docker command is static (shared with docker-compose.yml); refuse an ONNX whose inputs drifted from it.
    dims = onnx_input_dims(model)
    if dims != FUSION_INPUTS:
        raise TensorRTBuildError(f"{onnx_path} inputs {dims} differ from FUSION_INPUTS {FUSION_INPUTS}; update both")
    missing = unsupported_ops(model)
    if missing:
        raise TensorRTBuildError(f"{onnx_path} uses ops TensorRT cannot import: {missing}")
    (root / docker_timing_cache(release)).parent.mkdir(parents=True, exist_ok=True)
    if options.get("calibration_cache"):
        options["calibration_cache"] = _repo_relative(Path(options["calibration_cache"]), root)
    command = docker_build_command(
        root, release, onnx_relpath=_repo_relative(onnx_path, root), plan_relpath=_repo_relative(plan_path, root),
        **options,
    )
    before = plan_path.stat().st_mtime if plan_path.exists() else None
    started = time.perf_counter()
    status, tail, _ = _run_streaming(command, log, "[trtexec]")
    if status != 0:
        raise TensorRTBuildError(f"the docker build exited with status {status}; its last lines:\n" + "\n".join(tail))
    if not plan_path.is_file() or plan_path.stat().st_mtime == before:
        raise TensorRTBuildError(f"the docker build finished but {plan_path} was not written")
    log(f"[tensorrt] wrote {plan_path} ({plan_path.stat().st_size / 2**20:.1f} MiB) with TensorRT "
        f"{NGC_TENSORRT.get(release, '?')} from {tensorrt_image(release)} in {time.perf_counter() - started:.0f} s")
    return plan_path


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _write_status(path: Path | None, status: str) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(status + "\n")


def _parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m build.tensorrt", description="Build the fusion TensorRT plan from its ONNX export."
    )
    parser.add_argument("--onnx", type=Path, default=REPO_ROOT / ONNX_RELPATH)
    parser.add_argument("--plan", type=Path, default=REPO_ROOT / PLAN_RELPATH)
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="FP16 kernels (default on)")
    parser.add_argument("--int8", action="store_true", help="INT8 (needs a Q/DQ ONNX or --calibration-cache)")
    parser.add_argument("--calibration-cache", type=Path, help="INT8 calibration cache made on representative faces")
    parser.add_argument("--min-batch", type=int, default=MIN_BATCH)
    parser.add_argument("--opt-batch", type=int, default=OPT_BATCH)
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH)
    parser.add_argument("--workspace-mib", type=int, default=WORKSPACE_MIB)
    parser.add_argument("--timing-cache", type=Path, help="default: .cache/tensorrt/<model>-trt<version>.timing")
    parser.add_argument("--release", default=NGC_RELEASE, help="NGC release the engine must match (default 24.10)")
    parser.add_argument(
        "--docker", choices=("never", "auto", "always"), default="auto",
        help="build in the NGC TensorRT container: auto = when no local TensorRT and docker has an NVIDIA runtime",
    )
    parser.add_argument("--require", action="store_true", help="exit 2 instead of 0 when no TensorRT is available")
    parser.add_argument("--print-docker-command", action="store_true", help="print the docker command and exit")
    parser.add_argument("--status-file", type=Path, help="also write built|skipped|missing|failed to this file")
    return parser.parse_args(argv)


def main(argv: Iterable[str] | None = None) -> int:
    args = _parse_args(argv)
    batches = dict(min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch)
    precision = dict(fp16=args.fp16, int8=args.int8)
    if args.print_docker_command:
        try:
            calib = _repo_relative(args.calibration_cache, REPO_ROOT) if args.calibration_cache else None
            command = docker_build_command(
                REPO_ROOT, args.release, onnx_relpath=_repo_relative(args.onnx, REPO_ROOT),
                plan_relpath=_repo_relative(args.plan, REPO_ROOT), calibration_cache=calib,
                workspace_mib=args.workspace_mib, **precision, **batches,
            )
        except ValueError as error:
            print(f"TensorRT: {error}", file=sys.stderr)
            return 1
        # trtexec cannot create the timing-cache directory (it fails opening the cache's lock file), and a directory
        # docker creates for a bind mount would belong to root; so make it here, as the user who runs the command.
        (REPO_ROOT / docker_timing_cache(args.release)).parent.mkdir(parents=True, exist_ok=True)
        print(shlex.join(command))
        return 0

    tool = None if args.docker == "always" else find_tensorrt()
    use_docker = tool is None and (args.docker == "always" or (args.docker == "auto" and docker_gpu_available()))
    try:
        if tool is not None:
            build_plan(
                args.onnx, args.plan, timing_cache=args.timing_cache, workspace_mib=args.workspace_mib,
                calibration_cache=args.calibration_cache, tool=tool, release=args.release, **precision, **batches,
            )
            print(f"TensorRT: built {args.plan} with {tool.describe()}", flush=True)
        elif use_docker:
            build_plan_in_docker(
                REPO_ROOT, args.release, onnx_path=args.onnx, plan_path=args.plan,
                calibration_cache=args.calibration_cache, workspace_mib=args.workspace_mib, **precision, **batches,
            )
            print(f"TensorRT: built {args.plan} in {tensorrt_image(args.release)}", flush=True)
        else:
            notice = not_found_notice(docker_checked=args.docker == "auto")
            if args.require:
                print(notice, file=sys.stderr)
                _write_status(args.status_file, "missing")
                return 2
            print(notice)
            _write_status(args.status_file, "skipped")
            return 0
    except (TensorRTBuildError, ValueError, FileNotFoundError) as error:
        print(f"TensorRT: build failed: {error}", file=sys.stderr)
        _write_status(args.status_file, "failed")
        return 1
    _write_status(args.status_file, "built")
    return 0


if __name__ == "__main__":
    sys.exit(main())

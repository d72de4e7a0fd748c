"""Runs the fusion network with the best runtime present: TensorRT plan, else PyTorch on CUDA, else ONNX Runtime
on the CPU (DESIGN.md section 4). Every runtime takes and returns the same named float32 arrays."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from facefuse.batch_buckets import bucket_size, bucket_sizes
from facefuse.network import INPUT_NAMES, OUTPUT_NAMES, input_dtype

RUNTIME_CHOICES = ("auto", "tensorrt", "torch-cuda", "onnxruntime-cpu", "torch-cpu")
log = logging.getLogger("facefuse.fusion")

Arrays = dict[str, np.ndarray]


class FusionRuntime:
    name = "base"
    max_batch = 32

    @property
    def gpu_tensors(self) -> bool:
        """True when ``run_on_device`` takes and returns tensors in GPU memory (PyTorch on CUDA)."""
        return False

    def run_on_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError(f"{self.name} runs on host arrays only")

    def run(self, inputs: Arrays) -> Arrays:
        """Run any batch size by chunking it to the runtime's maximum."""
        batch = len(inputs[INPUT_NAMES[0]])
        if batch <= self.max_batch:
            return self._run(inputs)
        parts = [self._run({k: v[i:i + self.max_batch] for k, v in inputs.items()})
                 for i in range(0, batch, self.max_batch)]
        return {name: np.concatenate([part[name] for part in parts]) for name in OUTPUT_NAMES}

    def _run(self, inputs: Arrays) -> Arrays:
        raise NotImplementedError


class OnnxRuntimeCpu(FusionRuntime):
    name = "onnxruntime-cpu"

    def __init__(self, onnx_path: Path, threads: int = 0) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.max_batch = 1 << 30

    def _run(self, inputs: Arrays) -> Arrays:
        feeds = {name: np.ascontiguousarray(inputs[name], dtype=np.float32) for name in INPUT_NAMES}
        return dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), feeds)))


class TorchRuntime(FusionRuntime):
    """The nn.Module itself; FP16 on CUDA (the sweet spot the design asks for), FP32 on the CPU.

    On CUDA each batch is padded up to a bucket (1, 2, 4, ... 32) whose forward pass was captured once as a CUDA
    graph: the network is ~100 small kernels, so replaying a graph instead of launching them one by one is what
    makes small batches fast (8x at batch 1 on an H200)."""

    BUCKETS = bucket_sizes(32)

    def __init__(self, device: str = "cuda", half: bool | None = None, cuda_graphs: bool = True,
                 compile_network: bool = False) -> None:
        """``compile_network``: run the network through torch.compile (Inductor fuses its element-wise steps; H200,
        FP16, batch 32: 2.0x the eager graphs' faces/s) at the price of compiling at load (H200: 24 s for the first
        bucket, seconds for each later one; Inductor's on-disk cache shortens later loads)."""
        import torch

        from facefuse.network import FusionNetwork

        self.torch = torch
        self.device = torch.device(device)
        self.half = self.device.type == "cuda" if half is None else half
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.name = (f"torch-{self.device.type}" + ("-fp16" if self.half else "")
                     + ("-graphs" if self.use_graphs else "") + ("-compiled" if compile_network else ""))
        network = FusionNetwork().eval().to(self.device)
        self.network = network.half() if self.half else network
        # Every bucket's batch size through one compiled function (dynamic batch axis).
        self.forward = torch.compile(self.network, dynamic=True) if compile_network else self.network
        self.dtype = torch.float16 if self.half else torch.float32
        self.max_batch = self.BUCKETS[-1] if self.use_graphs else 1 << 30
        self.graphs: dict[int, tuple[object, list, tuple]] = {}

    def _graph(self, bucket: int, shapes: dict[str, tuple[int, ...]]) -> tuple[object, list, tuple]:
        torch = self.torch
        if bucket not in self.graphs:
            static_inputs = [torch.zeros((bucket, *shapes[name]), dtype=input_dtype(name, self.dtype),
                                         device=self.device) for name in INPUT_NAMES]
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # warm-up on a side stream, as graph capture requires
                    self.forward(*static_inputs)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                static_outputs = self.forward(*static_inputs)
            self.graphs[bucket] = (graph, static_inputs, static_outputs)
        return self.graphs[bucket]

    def _run(self, inputs: Arrays) -> Arrays:
        return {name: output.cpu().numpy() for name, output in self._forward(inputs).items()}

    @property
    def gpu_tensors(self) -> bool:
        return self.device.type == "cuda"

    def run_on_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``run`` with inputs that may already be tensors (e.g. in GPU memory, from preprocess through DLPack) and
        float32 outputs left on the runtime's device (for postprocess, through DLPack): no trip through the host."""
        torch = self.torch
        batch = len(inputs[INPUT_NAMES[0]])
        parts = [self._forward({name: value[first:first + self.max_batch] for name, value in inputs.items()})
                 for first in range(0, batch, self.max_batch)]
        if len(parts) == 1:
            return parts[0]
        return {name: torch.cat([part[name] for part in parts]) for name in OUTPUT_NAMES}

    def _forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Float32 output tensors on the device, owned by the caller (not the graph's buffers, which the next
        replay overwrites)."""
        torch = self.torch
        batch = len(inputs[INPUT_NAMES[0]])
        with torch.inference_mode():
            tensors = [self._tensor(inputs[name], input_dtype(name, self.dtype)) for name in INPUT_NAMES]
            if not self.use_graphs:
                outputs = self.forward(*tensors)
                return {name: out.to(torch.float32) for name, out in zip(OUTPUT_NAMES, outputs)}
            bucket = bucket_size(batch)
            graph, static_inputs, static_outputs = self._graph(
                bucket, {name: tuple(tensor.shape[1:]) for name, tensor in zip(INPUT_NAMES, tensors)})
            for static, tensor in zip(static_inputs, tensors):
                static[:batch].copy_(tensor)
                if batch < bucket:  # padding rows repeat the first row: valid inputs, results discarded
                    static[batch:].copy_(tensor[:1].expand(bucket - batch, *tensor.shape[1:]))
            graph.replay()
            return {name: out[:batch].to(torch.float32, copy=True) for name, out in zip(OUTPUT_NAMES, static_outputs)}

    def _tensor(self, value: Any, dtype: Any) -> Any:
        """An input batch (host array or tensor) on the runtime's device in ``dtype``."""
        if isinstance(value, np.ndarray):
            value = self.torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        return value.to(self.device, dtype)


class TensorRTRuntime(FusionRuntime):
    """A lean TensorRT 10 runner: one execution context, device buffers reused across calls."""

    name = "tensorrt"

    def __init__(self, plan_path: Path, device_id: int = 0) -> None:
        import tensorrt as trt
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device_id)
        torch.cuda.set_device(self.device)  # multi-GPU hosts: bind explicitly before deserialising
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialise {plan_path} (built for another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        profile_shape = self.engine.get_tensor_profile_shape(INPUT_NAMES[0], 0)
        self.max_batch = int(profile_shape[2][0])
        self.min_batch = int(profile_shape[0][0])
        self.stream = torch.cuda.Stream(self.device)
        self.buffers: dict[str, object] = {}

    def _buffer(self, name: str, shape: tuple[int, ...]) -> object:
        torch = self.torch
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape[0] < shape[0]:
            buffer = torch.empty((self.max_batch, *shape[1:]), dtype=torch.float32, device=self.device)
            self.buffers[name] = buffer
        return buffer[: shape[0]]

    def _run(self, inputs: Arrays) -> Arrays:
        torch = self.torch
        batch = len(inputs[INPUT_NAMES[0]])
        if not self.min_batch <= batch <= self.max_batch:  # outside the profile the engine would fail
            raise ValueError(f"batch {batch} outside the engine's profile {self.min_batch}..{self.max_batch}")
        with torch.cuda.stream(self.stream):
            for name in INPUT_NAMES:
                array = np.ascontiguousarray(inputs[name], dtype=np.float32)
                buffer = self._buffer(name, array.shape)
                buffer.copy_(torch.from_numpy(array), non_blocking=True)
                self.context.set_input_shape(name, tuple(array.shape))
                self.context.set_tensor_address(name, buffer.data_ptr())
            outputs = {}
            for name in OUTPUT_NAMES:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = self._buffer(name, shape)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            self.stream.synchronize()
            return {name: out.cpu().numpy() for name, out in outputs.items()}


def warm_up(runtime: FusionRuntime, batch: int = 2) -> list[int]:
    """Calls at load time with plausible inputs, so kernels are chosen and memory is reserved before traffic: one
    batch of ``batch`` rows, or with CUDA graphs one per batch bucket (each bucket's graph is captured on its first
    batch, a stall a request would otherwise wait for). Returns the batch sizes run."""
    from facefuse.network import example_inputs

    sizes = list(runtime.BUCKETS) if getattr(runtime, "use_graphs", False) else [batch]
    for size in sizes:
        runtime.run({name: tensor.numpy() for name, tensor in zip(INPUT_NAMES, example_inputs(size))})
    return sizes


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def load_runtime(model_dir: Path, choice: str = "auto", device_id: int = 0,
                 report: Callable[[str], None] = log.info, torch_compile: bool = False) -> FusionRuntime:
    """Load the runtime named by `choice`, or with "auto" the best one that works, reporting each decision.
    ``torch_compile``: torch-cuda compiles the network (TorchRuntime's compile_network)."""
    if choice not in RUNTIME_CHOICES:
        raise ValueError(f"unknown fusion runtime {choice!r}; choose from {RUNTIME_CHOICES}")
    plan_path, onnx_path = model_dir / "model.plan", model_dir / "model.onnx"
    attempts: list[tuple[str, Callable[[], FusionRuntime]]] = [
        ("tensorrt", lambda: TensorRTRuntime(plan_path, device_id)),
        ("torch-cuda", lambda: TorchRuntime(f"cuda:{device_id}", compile_network=torch_compile)),
        ("onnxruntime-cpu", lambda: OnnxRuntimeCpu(onnx_path)),
        ("torch-cpu", lambda: TorchRuntime("cpu")),
    ]
    # torch-cpu is for tests and explicit choice only.
    attempts = [attempt for attempt in attempts if attempt[0] == choice] if choice != "auto" else attempts[:3]
    reasons = []
    for name, make in attempts:
        skip = None
        if name == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
            skip = "the tensorrt module is not installed"
        elif name == "tensorrt" and not plan_path.exists():
            skip = f"no plan at {plan_path} (make build makes one where TensorRT exists)"
        elif name == "torch-cuda" and not _cuda_available():
            skip = "no CUDA device visible to PyTorch"
        elif name == "onnxruntime-cpu" and not onnx_path.exists():
            skip = f"no ONNX model at {onnx_path} (run make build)"
        if skip is None:
            try:
                runtime = make()
            except Exception as error:  # noqa: BLE001 - any load failure means: try the next runtime
                skip = f"failed to load: {error}"
            else:
                warm_up(runtime)
                report(f"fusion runtime: {runtime.name}" + (f" (skipped: {'; '.join(reasons)})" if reasons else ""))
                if torch_compile and name != "torch-cuda":
                    report(f"torch_compile not applied: it is for torch-cuda, the runtime is {runtime.name}")
                return runtime
        reasons.append(f"{name}: {skip}")
        report(f"fusion runtime {name} not used: {skip}")
    raise RuntimeError("no fusion runtime could be loaded: " + "; ".join(reasons))

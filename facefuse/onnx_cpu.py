"""Small PyTorch graphs (BlazeFace, the face mesh) run on the CPU through ONNX Runtime.

Both are depthwise-convolution nets, which PyTorch runs slowly on the CPU; ONNX Runtime runs the same graph exported
in memory at load (under a second): 2 cores, BlazeFace 4x faster, the face mesh at batch 2 9.5 instead of 14-17 ms,
outputs within ~1e-4. Used where the `onnx` exporter and `onnxruntime` are installed (runtime "auto" on the CPU).
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from typing import Any

import torch

RUNTIMES = ("auto", "torch", "onnxruntime")


def uses_onnxruntime(runtime: str, device: torch.device) -> bool:
    """Whether a net with this ``runtime`` choice on ``device`` runs in ONNX Runtime (ValueError for a bad choice)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    available = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
    return runtime == "onnxruntime" or (runtime == "auto" and device.type == "cpu" and available)


def export_in_memory(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    """``module`` as an ONNX graph (opset 17, one input "x" with a dynamic batch axis)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the exporter's notes on its legacy path are not for service logs
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), buffer, input_names=["x"], dynamic_axes={"x": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return buffer.getvalue()


def cpu_session(model: bytes) -> Any:
    """An ONNX Runtime CPU session with the model instance's thread cap (torch's, set from `cpu_threads`) whose idle
    threads sleep rather than spin (several model processes share the cores)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

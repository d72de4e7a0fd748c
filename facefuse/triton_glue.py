"""Small helpers shared by the model.py files: tensor <-> Python conversion and error translation.

pb_utils only exists inside Triton's Python stub, so the models pass it in rather than this module importing it.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from facefuse.errors import INTERNAL_ERROR, FusionError

log = logging.getLogger("facefuse.triton")


def bytes_rows(array: np.ndarray) -> list[bytes]:
    """A BYTES tensor of shape (N, 1) as N Python bytes objects."""
    return [bytes(item) if not isinstance(item, str) else item.encode("utf-8") for item in array.reshape(-1)]


def bytes_tensor(values: list[bytes]) -> np.ndarray:
    """N bytes objects as an (N, 1) object array, the layout Triton expects for BYTES."""
    array = np.empty((len(values), 1), dtype=object)
    for row, value in enumerate(values):
        array[row, 0] = value
    return array


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


def choice_parameter(parameters: dict[str, str], key: str, choices: tuple[str, str]) -> str:
    """The parameter ``key``, one of ``choices`` (absent: the first); any other value fails the model's load."""
    value = parameters.get(key, choices[0])
    if value not in choices:
        raise ValueError(f'{key} must be "{choices[0]}" or "{choices[1]}", got {value!r}')
    return value


def error_response(pb_utils: Any, error: BaseException) -> Any:
    """An InferenceResponse carrying `CODE: sentence`; unexpected faults become INTERNAL_ERROR and are logged."""
    if isinstance(error, FusionError):
        code = pb_utils.TritonError.INVALID_ARG if error.is_client_error else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), code))
    log.error("unexpected error: %s", "".join(traceback.format_exception(error)))
    message = f"{INTERNAL_ERROR}: {type(error).__name__}: {error}"
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL))


def guarded(pb_utils: Any, requests: list[Any], handle_batch: Callable[[list[Any]], list[Any]]) -> list[Any]:
    """Run `handle_batch`; if it fails as a whole, retry request by request so only the bad one fails."""
    try:
        return handle_batch(requests)
    except Exception:  # noqa: BLE001 - isolate the failing request below
        responses = []
        for request in requests:
            try:
                responses.extend(handle_batch([request]))
            except Exception as error:  # noqa: BLE001
                responses.append(error_response(pb_utils, error))
        return responses


def limit_threads(parameters: dict[str, str], default: int = 2) -> int:
    """Cap torch's and OpenCV's thread pools for this model instance (parameter `cpu_threads`)."""
    import cv2
    import torch

    threads = max(1, int(parameters.get("cpu_threads", default) or default))
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return threads


def instance_device(requested: str, args: dict[str, Any]) -> str:
    """The torch device a model instance works on: ``requested`` ("cpu", "cuda", "cuda:N") as it is, or for "auto"
    the GPU when PyTorch sees one (a KIND_GPU instance's own GPU, made the current device, so several GPUs each get
    their own work) else "cpu"."""
    if requested != "auto":
        return requested
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if args.get("model_instance_kind") != "GPU":
        return "cuda"
    device = f"cuda:{int(args['model_instance_device_id'])}"
    torch.cuda.set_device(device)
    return device


def input_value(tensor: Any) -> Any:
    """A pb_utils input tensor as a host numpy array, or, when Triton hands it over in GPU memory (the model's
    FORCE_CPU_ONLY_INPUT_TENSORS is "no"), as a torch CUDA tensor sharing that memory (DLPack, no copy)."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    import torch.utils.dlpack

    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())


def output_tensors(pb_utils: Any, responses: list[dict[str, Any]]) -> list[list[Any]]:
    """Each response's pb_utils output tensors, by name: a numpy array as it is, a torch tensor through DLPack (a
    CUDA tensor stays in GPU memory, so the next model of the ensemble takes it without a round trip through the
    host).

    Triton copies a CUDA output as soon as its response is sent, on its own stream, so the kernels that produced it
    must have finished: one wait per device for the whole batch, not one per tensor (7 outputs x 8 responses of a
    preprocess batch). Served, that measured no faster (H100, c=128: 780.25 vs 779.44 images/s, session 19): it is
    kept as the fewer calls for the same result."""
    import torch.utils.dlpack

    for device in {value.device for outputs in responses for value in outputs.values()
                   if isinstance(value, torch.Tensor) and value.is_cuda}:
        torch.cuda.current_stream(device).synchronize()
    return [[pb_utils.Tensor(name, value) if isinstance(value, np.ndarray)
             else pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))
             for name, value in outputs.items()] for outputs in responses]

"""Triton model `postprocess`: tensors in and out of facefuse.pipeline.finish."""

import json
import os
import sys
import time

# The pytriton stub ignores PYTHONPATH; put its entries (the facefuse package, the venv) on sys.path.
for _path in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    if _path and _path not in sys.path:
        sys.path.insert(0, _path)

# Before numpy, OpenCV and torch load: their thread pools are sized at import.
from facefuse.process_env import set_process_defaults  # noqa: E402

set_process_defaults()

import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from facefuse.device_imaging import host_array, image_to_device  # noqa: E402
from facefuse.errors import INTERNAL_ERROR, FusionError  # noqa: E402
from facefuse.execute_log import ExecuteLog, batch_stages  # noqa: E402
from facefuse.hostmem import freeze_heap, keep_freed_memory  # noqa: E402
from facefuse.label import DEFAULT_LABEL, DEFAULT_POSITION, validate_label  # noqa: E402
from facefuse.options import parse_options  # noqa: E402
from facefuse.pipeline import POSTPROCESS_STAGES, finish, unpad_image  # noqa: E402
from facefuse.postprocess_torch import FinishRow, finish_torch_batch, warm_up  # noqa: E402
from facefuse.triton_glue import (  # noqa: E402
    bytes_rows,
    bytes_tensor,
    error_response,
    input_value,
    instance_device,
    json_bytes,
    limit_threads,
    model_parameters,
)

# Inside the ensemble TARGET_RGB only arrives empty when Triton could not place preprocess's GPU tensor (Triton 2.51
# then passes an empty tensor on rather than failing).
EMPTY_TARGET = ("TARGET_RGB arrived empty: Triton's CUDA memory pool is probably exhausted (raise "
                "--cuda-memory-pool-byte-size, or set preprocess's outputs_on_gpu parameter to \"no\")")


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        parameters = model_parameters(self.model_config)
        limit_threads(parameters)
        keep_freed_memory()  # large image buffers are reused, not page-faulted in afresh per request
        # The visible label is the operator's: OPTIONS can ask for it but not change its text or place. A bad value
        # fails the load.
        self.label_text = parameters.get("label_text") or DEFAULT_LABEL
        self.label_position = parameters.get("label_position") or DEFAULT_POSITION
        validate_label(self.label_text, self.label_position)
        # "auto": paste, watermark and JPEG encode on the GPU (facefuse.postprocess_torch, nvJPEG) when PyTorch sees
        # one; on CPU-only hosts OpenCV (pipeline.finish) is about 2x faster than torch.
        device = instance_device(parameters.get("device", "auto"), args)
        self.device = None
        if device != "cpu":
            self.device = torch.device(device)
            # The first request would otherwise pay for nvJPEG's set-up, torchvision's import and kernel loading.
            pb_utils.Logger.log_info(f"postprocess: warm-up on {device} took {warm_up(self.device):.0f} ms")
        pb_utils.Logger.log_info(f"postprocess: paste, watermark and encode on {device}")
        self.execute_log = ExecuteLog("postprocess")  # FACEFUSE_EXECUTE_LOG: each batch's wall time (bench.run)
        freeze_heap()  # start-up's objects out of the collector's full passes (they ran inside requests)

    def execute(self, requests):
        with self.execute_log.batch(len(requests)):
            return self._execute(requests)

    def _execute(self, requests):
        # Every row of every request in one pass: on the GPU the watermarks and JPEG encodes of the whole batch run
        # together (facefuse.postprocess_torch.finish_torch_batch). Each request answers for itself.
        parsed = [self._rows(request) for request in requests]
        rows = [row for item in parsed if not isinstance(item, Exception) for row in item]
        started = time.perf_counter()
        if self.device is None:
            finished = []
            for row in rows:
                try:
                    finished.append(finish(row.target, row.fused_crop, row.blend_mask, row.target_matrix, row.options,
                                           row.metadata, self.label_text, self.label_position))
                except Exception as error:  # noqa: BLE001 - this row's request gets the error
                    finished.append(error)
        else:
            try:
                finished = finish_torch_batch(rows, self.label_text, self.label_position)
            except Exception as error:  # noqa: BLE001 - a fault of the batch as a whole fails each of its requests
                finished = [error] * len(rows)
        total_ms = round((time.perf_counter() - started) * 1000 / max(1, len(rows)), 2)
        if self.execute_log.enabled:
            self.execute_log.note(batch_stages([result[1]["timings_ms"] for result in finished
                                                if not isinstance(result, Exception)], POSTPROCESS_STAGES))
        responses, position = [], 0
        for item in parsed:
            if isinstance(item, Exception):
                responses.append(error_response(pb_utils, item))
                continue
            results = finished[position:position + len(item)]
            position += len(item)
            failure = next((result for result in results if isinstance(result, Exception)), None)
            if failure is not None:
                responses.append(error_response(pb_utils, failure))
                continue
            for _, metadata in results:
                metadata["timings_ms"]["postprocess_total"] = total_ms
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("FUSED_IMAGE", bytes_tensor([encoded for encoded, _ in results])),
                pb_utils.Tensor("METADATA", bytes_tensor([json_bytes(metadata) for _, metadata in results]))]))
        return responses

    def _rows(self, request):
        """The request's rows (targets on the postprocess device), or the exception that fails the request."""
        try:
            # With FORCE_CPU_ONLY_INPUT_TENSORS "no", an input may arrive in GPU memory (preprocess's TARGET_RGB on a
            # GPU host, a TensorRT fusion model's crops) as a torch tensor: the GPU path uses it there, the CPU path
            # and the 2x3 matrix want host arrays.
            tensors = {name: input_value(pb_utils.get_input_tensor_by_name(request, name)) for name in
                       ("FUSED_CROP", "BLEND_MASK", "TARGET_RGB", "TARGET_MATRIX", "PRE_METADATA", "OPTIONS")}
            for name in ("FUSED_CROP", "BLEND_MASK", "TARGET_MATRIX") if self.device is None else ("TARGET_MATRIX",):
                tensors[name] = host_array(tensors[name])
            targets = tensors["TARGET_RGB"]
            if (targets.numel() if isinstance(targets, torch.Tensor) else targets.size) == 0:
                raise FusionError(INTERNAL_ERROR, EMPTY_TARGET)
            rows = []
            for row in range(len(tensors["FUSED_CROP"])):
                metadata = json.loads(bytes_rows(tensors["PRE_METADATA"][row])[0])
                options = parse_options(bytes_rows(tensors["OPTIONS"][row])[0])
                target_rgb = unpad_image(tensors["TARGET_RGB"][row], metadata["target"]["height"],
                                         metadata["target"]["width"])
                if self.device is None:
                    target_rgb = host_array(target_rgb)
                elif isinstance(target_rgb, torch.Tensor):  # already in GPU memory: no copy at all
                    target_rgb = target_rgb.to(self.device)
                else:  # the 6 MB target goes up once; only the JPEG comes back
                    target_rgb = image_to_device(target_rgb, self.device)
                rows.append(FinishRow(target_rgb, tensors["FUSED_CROP"][row], tensors["BLEND_MASK"][row],
                                      tensors["TARGET_MATRIX"][row], options, metadata))
            return rows
        except Exception as error:  # noqa: BLE001 - every failure becomes this request's coded error
            return error

    def finalize(self):
        self.execute_log.close()

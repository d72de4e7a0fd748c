"""Triton model `fusion` (local server): the fusion network on the best runtime present."""

import itertools
import json
import os
import sys
from pathlib import Path

# The pytriton stub ignores PYTHONPATH; put its entries (the facefuse package, the venv) on sys.path.
for _path in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    if _path and _path not in sys.path:
        sys.path.insert(0, _path)

# Before numpy, OpenCV and torch load: their thread pools are sized at import.
from facefuse.process_env import set_process_defaults  # noqa: E402

set_process_defaults()

import triton_python_backend_utils as pb_utils  # noqa: E402

from facefuse.device_imaging import concat_rows  # noqa: E402
from facefuse.execute_log import ExecuteLog  # noqa: E402
from facefuse.fusion_runtime import load_runtime  # noqa: E402
from facefuse.hostmem import freeze_heap, keep_freed_memory  # noqa: E402
from facefuse.network import INPUT_NAMES, OUTPUT_NAMES  # noqa: E402
from facefuse.triton_glue import (  # noqa: E402
    choice_parameter,
    guarded,
    input_value,
    limit_threads,
    model_parameters,
    output_tensors,
)


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(json.loads(args["model_config"]))
        limit_threads(parameters)
        keep_freed_memory()  # large image buffers are reused, not page-faulted in afresh per request
        model_dir = Path(args["model_repository"]) / args["model_version"]
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        torch_compile = choice_parameter(parameters, "torch_compile", ("no", "yes"))
        self.runtime = load_runtime(model_dir, parameters.get("runtime", "auto"), device_id,
                                    report=pb_utils.Logger.log_info, torch_compile=torch_compile == "yes")
        tensors_on_gpu = choice_parameter(parameters, "tensors_on_gpu", ("auto", "no"))
        self.gpu_tensors = tensors_on_gpu == "auto" and self.runtime.gpu_tensors
        pb_utils.Logger.log_info(f"fusion: tensors in {'GPU' if self.gpu_tensors else 'host'} memory")
        self.execute_log = ExecuteLog("fusion")  # FACEFUSE_EXECUTE_LOG: each batch's wall time (bench.run)
        freeze_heap()  # start-up's objects out of the collector's full passes (they ran inside requests)

    def execute(self, requests):
        with self.execute_log.batch(len(requests)):
            return guarded(pb_utils, requests, self._execute)

    def _execute(self, requests):
        # All requests of the batch go through the network in one call, then are split back.
        columns = {name: [] for name in INPUT_NAMES}
        counts = []
        for request in requests:
            for name in INPUT_NAMES:  # a host array, or a torch tensor where the input arrived in GPU memory
                columns[name].append(input_value(pb_utils.get_input_tensor_by_name(request, name)))
            counts.append(len(columns[INPUT_NAMES[0]][-1]))
        if self.gpu_tensors:
            outputs = self.runtime.run_on_device({name: concat_rows(parts, self.runtime.device)
                                                  for name, parts in columns.items()})
        else:
            outputs = self.runtime.run({name: concat_rows(parts, None) for name, parts in columns.items()})
        bounds = list(itertools.accumulate(counts, initial=0))
        return [pb_utils.InferenceResponse(tensors) for tensors in output_tensors(
            pb_utils, [{name: outputs[name][start:end] for name in OUTPUT_NAMES}
                       for start, end in zip(bounds, bounds[1:])])]

    def finalize(self):
        self.runtime = None
        self.execute_log.close()

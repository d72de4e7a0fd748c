"""Triton model `preprocess`: tensors in and out of facefuse.pipeline.Preprocessor."""

import json
import os
import sys

# The pytriton stub ignores PYTHONPATH; put its entries (the facefuse package, the venv) on sys.path.
for _path in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    if _path and _path not in sys.path:
        sys.path.insert(0, _path)

# Before numpy, OpenCV and torch load: their thread pools are sized at import.
from facefuse.process_env import set_process_defaults  # noqa: E402

set_process_defaults()

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from facefuse.blocklist import IdentityGuard  # noqa: E402
from facefuse.consent import ConsentPolicy  # noqa: E402
from facefuse.detection import FaceDetector  # noqa: E402
from facefuse.device_imaging import describe_jpeg_decoding, stack_rows  # noqa: E402
from facefuse.errors import FusionError  # noqa: E402
from facefuse.execute_log import ExecuteLog, batch_stages  # noqa: E402
from facefuse.face_mesh import FaceMesh  # noqa: E402
from facefuse.hostmem import freeze_heap, keep_freed_memory  # noqa: E402
from facefuse.imaging import ImageLimits  # noqa: E402
from facefuse.network import INPUT_NAMES  # noqa: E402
from facefuse.pipeline import (  # noqa: E402
    MIN_EYE_DISTANCE,
    PREPROCESS_STAGES,
    SERVICE_DETECTOR_MAX_SIDE,
    FusionRequest,
    PreparedFusion,
    Preprocessor,
    stack_images,
)
from facefuse.triton_glue import (  # noqa: E402,E501
    bytes_rows,
    bytes_tensor,
    choice_parameter,
    error_response,
    guarded,
    instance_device,
    json_bytes,
    limit_threads,
    model_parameters,
    output_tensors,
)


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        parameters = model_parameters(model_config)
        limit_threads(parameters)
        keep_freed_memory()  # large image buffers are reused, not page-faulted in afresh per request
        device = instance_device(parameters.get("detector_device", "auto"), args)
        limits = ImageLimits(max_bytes=int(parameters.get("max_image_bytes", ImageLimits.max_bytes)),
                             max_pixels=int(parameters.get("max_image_pixels", ImageLimits.max_pixels)),
                             max_side=int(parameters.get("max_image_side", ImageLimits.max_side)),
                             min_side=int(parameters.get("min_image_side", ImageLimits.min_side)))
        min_eye_distance = float(parameters.get("min_face_eye_distance", MIN_EYE_DISTANCE))
        # Safety (README "Safety"): a bad value fails the model load rather than serving without the check.
        consent = ConsentPolicy.parse(parameters.get("consent", "off"))
        identity_guard = None
        if parameters.get("blocklist_path", "").strip():  # dlib loads only then
            identity_guard = IdentityGuard.from_file(parameters["blocklist_path"].strip())
        detector_max_side = int(parameters.get("detector_max_side", SERVICE_DETECTOR_MAX_SIDE))
        cuda_graphs = choice_parameter(parameters, "cuda_graphs", ("yes", "no"))
        # BlazeFace and the face mesh through torch.compile inside their CUDA graphs (GPU only; compiles at load).
        compile_nets = choice_parameter(parameters, "compile_nets", ("no", "yes")) == "yes" and cuda_graphs == "yes"
        detector_images = choice_parameter(parameters, "detector_images", ("auto", "device"))
        detector = FaceDetector(device=device, max_side=detector_max_side,
                                proposals=parameters.get("detector_proposals", "auto"),
                                cuda_graphs=cuda_graphs == "yes", compile_nets=compile_nets,
                                images_on_device=True if detector_images == "device" else None)
        # TARGET_RGB and the network's crops in GPU memory (DLPack) when preprocess works on the GPU: postprocess and
        # fusion (FORCE_CPU_ONLY_INPUT_TENSORS "no") take them there, with no trip through the host and Triton's
        # shared memory (6 MB + 1.5 MB per request).
        outputs_on_gpu = choice_parameter(parameters, "outputs_on_gpu", ("auto", "no"))
        mesh = FaceMesh(device=device, cuda_graphs=cuda_graphs == "yes", compile_net=compile_nets)
        self.preprocessor = Preprocessor(detector, mesh, limits,
                                         min_eye_distance=min_eye_distance, consent=consent,
                                         identity_guard=identity_guard, outputs_on_device=outputs_on_gpu == "auto")
        # Every batch shape up to the config's max_batch_size rows, no larger (Triton never forms a larger batch).
        warmed = self.preprocessor.warm_up(max_rows=int(model_config["max_batch_size"]))
        target_place = f"{device} tensors" if self.preprocessor.keeps_outputs_on_device else "host arrays"
        blocklist = (f"{len(identity_guard.blocklist)} identities, threshold {identity_guard.blocklist.threshold}"
                     if identity_guard else "off")
        graphs = "CUDA graphs" if detector.pad_batches and cuda_graphs == "yes" else "no CUDA graphs"
        if detector.pad_batches and compile_nets:
            graphs += " of torch.compile'd BlazeFace and mesh"
        pb_utils.Logger.log_info(f"preprocess: MTCNN detector ({detector.proposals} proposals, photos shrunk to "
                                 f"{detector_max_side} px) and face mesh on {device} ({graphs}), "
                                 f"JPEG decoding: {describe_jpeg_decoding(device)}, "
                                 f"TARGET_RGB and crops as {target_place}, limits {limits}, "
                                 f"min_face_eye_distance {min_eye_distance}, consent {consent.describe()}, "
                                 f"blocklist {blocklist}; warmed up on {warmed} sample rows")
        self.execute_log = ExecuteLog("preprocess")  # FACEFUSE_EXECUTE_LOG: each batch's wall time (bench.run)
        freeze_heap()  # start-up's objects out of the collector's full passes (they ran inside requests)

    def execute(self, requests):
        with self.execute_log.batch(len(requests)):
            return guarded(pb_utils, requests, self._execute)

    def _execute(self, requests):
        rows, row_counts = [], []
        for request in requests:
            columns = [pb_utils.get_input_tensor_by_name(request, name) for name in
                       ("SOURCE_IMAGE", "TARGET_IMAGE", "FACE_DEGREE", "PROFILE_DEGREE", "OPTIONS")]
            sources, targets = bytes_rows(columns[0].as_numpy()), bytes_rows(columns[1].as_numpy())
            face_degrees = columns[2].as_numpy().reshape(-1)
            profile_degrees = columns[3].as_numpy().reshape(-1)
            options = bytes_rows(columns[4].as_numpy()) if columns[4] is not None else [b""] * len(sources)
            row_counts.append(len(sources))
            rows.extend(FusionRequest(*row) for row in zip(sources, targets, face_degrees, profile_degrees, options))
        # The whole batch goes through detection together; errors stay with their own request.
        prepared = self.preprocessor.prepare_batch(rows)
        if self.execute_log.enabled:
            self.execute_log.note(batch_stages([result.metadata["timings_ms"] for result in prepared
                                                if isinstance(result, PreparedFusion)], PREPROCESS_STAGES))
        # Each request's outputs first, then their tensors with one wait for the GPU for the whole batch.
        outcomes, start = [], 0
        for count in row_counts:
            results = prepared[start:start + count]
            start += count
            failure = next((result for result in results if isinstance(result, FusionError)), None)
            outcomes.append(failure if failure is not None else self._outputs(results))
        tensors = iter(output_tensors(pb_utils, [outcome for outcome in outcomes if isinstance(outcome, dict)]))
        return [error_response(pb_utils, outcome) if isinstance(outcome, FusionError)
                else pb_utils.InferenceResponse(next(tensors)) for outcome in outcomes]

    @staticmethod
    def _outputs(results):
        # The network's inputs under its own names: CROPS, and GEOMETRY with the checked degrees in it.
        tensors = {name: stack_rows([result.network_inputs[name] for result in results]) for name in INPUT_NAMES}
        tensors["TARGET_MATRIX"] = np.stack([result.target_matrix for result in results]).astype(np.float32)
        tensors["TARGET_RGB"] = stack_images([result.target_rgb for result in results])
        tensors["PRE_METADATA"] = bytes_tensor([json_bytes(result.metadata) for result in results])
        return tensors

    def finalize(self):
        self.preprocessor = None
        self.execute_log.close()

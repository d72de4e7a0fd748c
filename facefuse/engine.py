"""The whole pipeline in one process, without Triton: for evaluation, benchmarks' baselines and notebooks.

It runs exactly the code the three Triton models run (preprocess, the fusion runtime, postprocess).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from facefuse.detection import FaceDetector
from facefuse.errors import FusionError
from facefuse.face_mesh import FaceMesh
from facefuse.fusion_runtime import FusionRuntime, TorchRuntime, load_runtime
from facefuse.network import INPUT_NAMES, OUTPUT_NAMES
from facefuse.options import parse_options
from facefuse.pipeline import SERVICE_DETECTOR_MAX_SIDE, FusionRequest, PreparedFusion, Preprocessor, finish

FUSION_MODEL_DIR = Path(__file__).resolve().parent.parent / "model_repository" / "fusion" / "1"


def network_inputs(prepared: list[PreparedFusion]) -> dict[str, np.ndarray]:
    """Stack prepared requests into the fusion network's named batched inputs."""
    return {name: np.stack([row.network_inputs[name] for row in prepared]) for name in INPUT_NAMES}


class LocalFusion:
    """Preprocess -> fusion -> postprocess in this process. `runtime` as in the fusion model's parameter."""

    def __init__(self, runtime: str = "auto", device: str = "cpu", model_dir: Path = FUSION_MODEL_DIR,
                 detector_max_side: int = SERVICE_DETECTOR_MAX_SIDE, detector_proposals: str = "auto") -> None:
        self.preprocessor = Preprocessor(FaceDetector(device=device, max_side=detector_max_side,
                                                      proposals=detector_proposals),
                                         FaceMesh(device=device))
        if runtime == "torch-cpu":
            self.runtime: FusionRuntime = TorchRuntime("cpu")
        else:
            self.runtime = load_runtime(model_dir, runtime, report=lambda message: None)

    def fuse(self, source: bytes, target: bytes, face_degree: float = 100.0, profile_degree: float = 100.0,
             options: dict[str, Any] | None = None) -> tuple[bytes, dict[str, Any]]:
        """Fuse one pair; returns the encoded image and METADATA, or raises FusionError."""
        request = FusionRequest(source, target, face_degree, profile_degree, json.dumps(options or {}).encode())
        prepared = self.preprocessor.prepare_batch([request])[0]
        if isinstance(prepared, FusionError):
            raise prepared
        started = time.perf_counter()
        outputs = self.runtime.run(network_inputs([prepared]))
        prepared.metadata["timings_ms"]["fusion"] = round((time.perf_counter() - started) * 1000, 2)
        fused_crop, blend_mask = (outputs[name][0] for name in OUTPUT_NAMES)
        return finish(prepared.target_rgb, fused_crop, blend_mask, prepared.target_matrix,
                      parse_options(request.options), prepared.metadata)


__all__ = ["INPUT_NAMES", "LocalFusion", "network_inputs"]

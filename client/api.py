"""A small typed wrapper over tritonclient for the `face_fusion` ensemble."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from facefuse.errors import split_error_message

MODEL_NAME = "face_fusion"
PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
API_KEY_HEADER = "x-api-key"  # what the gateway (gateway/) checks: an HTTP header, or gRPC metadata


class FusionServerError(Exception):
    """The server refused or failed the request; `code` is the stable code (DESIGN.md section 3), if any."""

    def __init__(self, code: str, message: str, raw: str, status: str | None = None) -> None:
        super().__init__(f"{code}: {message}" if code else raw)
        self.code, self.message, self.raw, self.status = code, message, raw, status


@dataclass(frozen=True)
class FusionResult:
    image: bytes
    metadata: dict[str, Any]


def _bytes_input(module: Any, name: str, value: bytes) -> Any:
    tensor = module.InferInput(name, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[value]], dtype=object))
    return tensor


def _float_input(module: Any, name: str, value: float) -> Any:
    tensor = module.InferInput(name, [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.float32))
    return tensor


class FusionClient:
    """One connection to the service. `protocol` is "grpc" (default) or "http".

    `api_key` is sent as `x-api-key` with every call, for the gateway in front of Triton; a bare Triton ignores it.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout_s: float = 120.0,
                 api_key: str | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self._headers = {API_KEY_HEADER: api_key} if api_key else None
        if protocol == "grpc":
            import tritonclient.grpc as module
            self._client = module.InferenceServerClient(self.url)
        else:
            import tritonclient.http as module
            self._client = module.InferenceServerClient(self.url, connection_timeout=timeout_s,
                                                        network_timeout=timeout_s)
        self._module = module

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready(headers=self._headers))
        except Exception:  # noqa: BLE001 - unreachable counts as not ready
            return False

    def fuse(self, source: bytes, target: bytes, face_degree: float = 100.0, profile_degree: float = 100.0,
             options: dict[str, Any] | bytes | None = None) -> FusionResult:
        """Fuse the face in `source` into `target`; raises FusionServerError with the server's code."""
        raw_options = options if isinstance(options, bytes) else json.dumps(options or {}).encode("utf-8")
        module = self._module
        inputs = [
            _bytes_input(module, "SOURCE_IMAGE", source),
            _bytes_input(module, "TARGET_IMAGE", target),
            _float_input(module, "FACE_DEGREE", face_degree),
            _float_input(module, "PROFILE_DEGREE", profile_degree),
            _bytes_input(module, "OPTIONS", raw_options),
        ]
        outputs = [module.InferRequestedOutput("FUSED_IMAGE"), module.InferRequestedOutput("METADATA")]
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "grpc":
                result = self._client.infer(MODEL_NAME, inputs, outputs=outputs, headers=self._headers,
                                            client_timeout=self.timeout_s)
            else:
                result = self._client.infer(MODEL_NAME, inputs, outputs=outputs, headers=self._headers)
        except InferenceServerException as error:
            raw = error.message() or str(error)
            code, message = split_error_message(raw)
            raise FusionServerError(code, message, raw, str(error.status())) from None
        image = result.as_numpy("FUSED_IMAGE").reshape(-1)[0]
        metadata = result.as_numpy("METADATA").reshape(-1)[0]
        return FusionResult(image=bytes(image), metadata=json.loads(bytes(metadata)))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FusionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

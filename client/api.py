"""A small typed wrapper over tritonclient for the `face_fusion` ensemble."""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from facefuse.errors import split_error_message

MODEL_NAME = "face_fusion"
PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
API_KEY_HEADER = "x-api-key"  # what the gateway (gateway/) checks: an HTTP header, or gRPC metadata
# Answers worth retrying: the server (or the gateway) is down, restarting, overloaded or rate-limiting. Triton's
# queue policy refuses overload with UNAVAILABLE / HTTP 503; the gateway's rate limit is RESOURCE_EXHAUSTED / 429.
# Coded request errors (INVALID_ARGUMENT / 400, INTERNAL / 500) and deadlines are never retried.
RETRYABLE_STATUSES = ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED", "503", "429")
UNLOADED_MODEL = "has no available versions"


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


def is_retryable(error: BaseException) -> bool:
    """True for a refusal worth retrying: connection refused/reset, UNAVAILABLE / 503, RESOURCE_EXHAUSTED / 429."""
    if isinstance(error, FusionServerError):
        # While a server drains on SIGTERM its gRPC endpoint still answers, with NOT_FOUND "Request for unknown
        # model: 'face_fusion' has no available versions" (models unloaded): as transient as a refused connection.
        return error.status in RETRYABLE_STATUSES or (not error.code and UNLOADED_MODEL in error.raw)
    # tritonclient.http lets socket errors through: refused while the server is down, reset or closed when a
    # pooled connection outlived a restart. A TimeoutError is not a ConnectionError: the request may be running.
    return isinstance(error, ConnectionError) or type(error).__name__ == "HTTPConnectionClosed"


class FusionClient:
    """One connection to the service. `protocol` is "grpc" (default) or "http".

    `api_key` is sent as `x-api-key` with every call, for the gateway in front of Triton; a bare Triton ignores it.
    `retries` > 0 makes `fuse` retry refusals that say "try again later" (`is_retryable`) up to that many times,
    sleeping `backoff_s`, then twice as long each time (capped at `max_backoff_s`, with jitter), on a fresh
    connection. Off by default; fusion is stateless, so a retried request is safe (without a `watermark_id` option
    the retry draws a new random one).
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout_s: float = 120.0,
                 api_key: str | None = None, retries: int = 0, backoff_s: float = 0.5,
                 max_backoff_s: float = 8.0) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("retries, backoff_s and max_backoff_s must be >= 0")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.attempts = 0  # requests sent by the last fuse() call, retries included
        self._headers = {API_KEY_HEADER: api_key} if api_key else None
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        self._client = self._connect()

    def _connect(self) -> Any:
        if self.protocol == "grpc":
            return self._module.InferenceServerClient(self.url)
        return self._module.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                  network_timeout=self.timeout_s)

    def _reconnect(self) -> None:
        # A gRPC channel that failed to connect backs off on its own (up to minutes) before it tries again, and an
        # HTTP pool may hold sockets of a server that restarted: a retry starts from a fresh client.
        with contextlib.suppress(Exception):  # the old connection is being thrown away
            self._client.close()
        self._client = self._connect()

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready(headers=self._headers))
        except Exception:  # noqa: BLE001 - unreachable counts as not ready
            return False

    def fuse(self, source: bytes, target: bytes, face_degree: float = 100.0, profile_degree: float = 100.0,
             options: dict[str, Any] | bytes | None = None) -> FusionResult:
        """Fuse the face in `source` into `target`; raises FusionServerError with the server's code (after
        `retries` retries of retryable refusals, if any)."""
        self.attempts = 0
        while True:
            self.attempts += 1
            try:
                return self._fuse_once(source, target, face_degree, profile_degree, options)
            except Exception as error:
                if self.attempts > self.retries or not is_retryable(error):
                    raise
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (self.attempts - 1))
                time.sleep(delay * random.uniform(0.5, 1.0))  # jitter: clients refused together spread out
                self._reconnect()

    def _fuse_once(self, source: bytes, target: bytes, face_degree: float, profile_degree: float,
                   options: dict[str, Any] | bytes | None) -> FusionResult:
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

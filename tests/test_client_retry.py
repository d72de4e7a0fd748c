"""FusionClient's opt-in retry, without a server: which failures are retried, how often, and with what backoff."""

from __future__ import annotations

import pytest

import client.api as api
from client.api import FusionClient, FusionResult, FusionServerError, is_retryable


def refusal(status: str, raw: str = "", code: str = "") -> FusionServerError:
    return FusionServerError(code, raw, raw, status)


@pytest.mark.parametrize("error", [
    refusal("StatusCode.UNAVAILABLE", "failed to connect to all addresses"),
    refusal("StatusCode.UNAVAILABLE", "in ensemble 'face_fusion', Exceeds maximum queue size"),
    refusal("503", "in ensemble 'face_fusion', Exceeds maximum queue size"),
    refusal("StatusCode.RESOURCE_EXHAUSTED", "RATE_LIMITED: too many requests", "RATE_LIMITED"),
    refusal("429", "RATE_LIMITED: too many requests", "RATE_LIMITED"),
    refusal("StatusCode.NOT_FOUND", "Request for unknown model: 'face_fusion' has no available versions"),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
], ids=lambda error: repr(error)[:60])
def test_retryable(error):
    assert is_retryable(error)


@pytest.mark.parametrize("error", [
    refusal("StatusCode.INVALID_ARGUMENT", "INVALID_IMAGE: the source image is empty", "INVALID_IMAGE"),
    refusal("400", "INVALID_OPTIONS: OPTIONS is not valid UTF-8", "INVALID_OPTIONS"),
    refusal("StatusCode.INTERNAL", "in ensemble 'face_fusion', Stub process 'preprocess_0_0' is not healthy."),
    refusal("500", "INTERNAL_ERROR: ValueError: boom", "INTERNAL_ERROR"),
    refusal("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded"),
    refusal("StatusCode.UNAUTHENTICATED", "UNAUTHENTICATED: no API key", "UNAUTHENTICATED"),
    TimeoutError("timed out"),
    ValueError("not a transport error"),
], ids=lambda error: repr(error)[:60])
def test_not_retryable(error):
    assert not is_retryable(error)


class Scripted(FusionClient):
    """A client whose requests fail with the given errors first, then succeed; no network."""

    def __init__(self, failures: list[BaseException], **kwargs: object) -> None:
        self.failures = list(failures)
        self.reconnects = 0
        super().__init__("127.0.0.1:1", "grpc", **kwargs)

    def _connect(self) -> object:
        return type("Closable", (), {"close": lambda self: None})()

    def _reconnect(self) -> None:
        self.reconnects += 1

    def _fuse_once(self, *args: object) -> FusionResult:
        if self.failures:
            raise self.failures.pop(0)
        return FusionResult(b"image", {})


@pytest.fixture
def sleeps(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(api.time, "sleep", slept.append)
    return slept


def test_retries_until_success_with_exponential_backoff(sleeps):
    down = refusal("StatusCode.UNAVAILABLE", "failed to connect")
    client = Scripted([down] * 5, retries=6, backoff_s=1.0, max_backoff_s=4.0)
    assert client.fuse(b"s", b"t").image == b"image"
    assert client.attempts == 6 and client.reconnects == 5
    # 1, 2, 4, 4, 4 s, each scaled by a jitter in [0.5, 1].
    for slept, nominal in zip(sleeps, [1.0, 2.0, 4.0, 4.0, 4.0]):
        assert 0.5 * nominal <= slept <= nominal


def test_gives_up_after_the_last_retry(sleeps):
    down = ConnectionRefusedError(111, "Connection refused")
    client = Scripted([down] * 4, retries=3, backoff_s=0.1)
    with pytest.raises(ConnectionRefusedError):
        client.fuse(b"s", b"t")
    assert client.attempts == 4 and len(sleeps) == 3


def test_coded_errors_are_never_retried(sleeps):
    client = Scripted([refusal("StatusCode.INVALID_ARGUMENT", "INVALID_IMAGE: empty", "INVALID_IMAGE")], retries=5)
    with pytest.raises(FusionServerError) as caught:
        client.fuse(b"", b"t")
    assert caught.value.code == "INVALID_IMAGE" and client.attempts == 1 and sleeps == []


def test_no_retry_by_default(sleeps):
    client = Scripted([refusal("503", "Exceeds maximum queue size")])
    with pytest.raises(FusionServerError):
        client.fuse(b"s", b"t")
    assert client.attempts == 1 and sleeps == []


def test_bad_retry_settings_are_refused():
    with pytest.raises(ValueError):
        FusionClient("127.0.0.1:1", "grpc", retries=-1)

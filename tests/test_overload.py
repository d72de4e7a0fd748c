"""Queue policy under a flood: a second server whose preprocess queue holds one request refuses the excess at once
with UNAVAILABLE (gRPC) / 503 (HTTP) "Exceeds maximum queue size", serves the rest, and stays ready.

The shipped configs (model_repository/*/config.pbtxt) give every batching model `default_queue_policy {
max_queue_size: 128, timeout_action: REJECT, default_timeout_microseconds: 30 s }`; here preprocess gets size 1 and
a 2 s timeout so that a few concurrent requests are enough to overflow it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.hostile import _jpeg, _png, hanks, scene
from client.api import FusionClient, FusionServerError, is_retryable
from tests.servers import is_ready, serve_patched_copy, set_queue_policy

pytestmark = pytest.mark.live
FLOOD = 24  # concurrent requests, half over each protocol
REFUSALS = ("Exceeds maximum queue size", "Request timeout expired")


@pytest.fixture(scope="module")
def tiny_queue_server(tmp_path_factory):
    yield from serve_patched_copy(tmp_path_factory.mktemp("tiny_queue"), "test-overload-triton.log",
                                  {"preprocess": set_queue_policy(1, 2_000_000)})


def test_flood_is_refused_fast_and_the_rest_succeeds(tiny_queue_server):
    server = tiny_queue_server
    source, target = _png(hanks()), _jpeg(scene())

    def one(index: int) -> tuple[str, float, object]:
        protocol = ("grpc", "http")[index % 2]
        port = server.ports.grpc if protocol == "grpc" else server.ports.http
        started = time.monotonic()
        with FusionClient(f"127.0.0.1:{port}", protocol, timeout_s=300) as client:
            try:
                outcome: object = client.fuse(source, target, 80, 80)
            except FusionServerError as error:
                outcome = error
        return protocol, time.monotonic() - started, outcome

    with ThreadPoolExecutor(max_workers=FLOOD) as pool:
        futures = [pool.submit(one, index) for index in range(FLOOD)]
        results = [future.result(timeout=600) for future in futures]  # none hangs

    succeeded = [(protocol, seconds) for protocol, seconds, outcome in results
                 if not isinstance(outcome, FusionServerError)]
    refused = [(protocol, seconds, outcome) for protocol, seconds, outcome in results
               if isinstance(outcome, FusionServerError)]
    for protocol, _seconds, error in refused:
        # Triton's own refusal: no service code, the transport's "try later" status, which the client may retry.
        assert error.status == ("StatusCode.UNAVAILABLE" if protocol == "grpc" else "503"), error.raw
        assert any(reason in error.raw for reason in REFUSALS), error.raw
        assert not error.code and is_retryable(error)
    for protocol in ("grpc", "http"):
        assert any(p == protocol for p, _, _ in refused), f"no {protocol} request was refused"
    assert succeeded, "every request was refused"
    slowest_refusal = max(seconds for _, seconds, _ in refused)
    print(f"{len(succeeded)} served (slowest {max(s for _, s in succeeded):.2f} s), {len(refused)} refused "
          f"(slowest refusal {slowest_refusal:.2f} s)")
    assert is_ready(server.ports)


def test_retrying_client_gets_through_the_flood(tiny_queue_server):
    """With retries, every request of a smaller flood is served eventually: refusals are only 'not now'."""
    server = tiny_queue_server
    source, target = _png(hanks()), _jpeg(scene())

    def one(index: int) -> int:
        protocol = ("grpc", "http")[index % 2]
        port = server.ports.grpc if protocol == "grpc" else server.ports.http
        with FusionClient(f"127.0.0.1:{port}", protocol, timeout_s=300, retries=30, backoff_s=0.2,
                          max_backoff_s=2.0) as client:
            client.fuse(source, target, 80, 80)
            return client.attempts

    with ThreadPoolExecutor(max_workers=8) as pool:
        attempts = list(pool.map(one, range(8), timeout=600))
    print(f"attempts per request: {attempts}")
    assert max(attempts) > 1, "the flood was never refused, so the retry path was not exercised"
    assert is_ready(server.ports)

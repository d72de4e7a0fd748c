"""Faults on a live server of its own (free ports, explicit model control): a graceful shutdown with requests in
flight, a restart under a retrying client, and a Python stub killed under load.

What Triton 2.51's python backend does (the pytriton 0.7.0 wheel's server; asserted below):

* A stub killed (SIGKILL) is **not restarted**. The requests its instance is executing, and every later request to
  it, fail at once with INTERNAL (HTTP 500) `Stub process 'preprocess_0_0' is not healthy.` (behind the ensemble
  prefix), while `/v2/health/ready` and the model's ready endpoint keep answering 200: nothing outside notices.
  With two instances Triton keeps handing requests to the dead one while the other serves.
  facefuse/watchdog.py notices (it watches the server's stub processes) and reloads the model in place through the
  repository API, which needs `--model-control-mode=explicit --load-model=*` (facefuse.watchdog.SELF_HEAL_ARGS); the
  ensemble stays READY and requests succeed again once the new stub is up (seconds).
* After a stub died with requests in flight, the dead instance never finishes unloading: a later graceful shutdown
  waits the whole `--exit-timeout-secs` (30 s here) and exits 1. Not asserted (it costs 30 s); the fixture kills
  such a server.
* SIGTERM/SIGINT: Triton stops accepting HTTP connections at once (refused or closed), keeps serving gRPC until
  its in-flight requests are done and the models unload, then answers gRPC with NOT_FOUND "Request for unknown
  model: 'face_fusion' has no available versions"; it finishes the requests its models are working on and exits 0.
  An ensemble request between two steps then meets a composing model that stopped taking work: UNAVAILABLE / 503
  "Server is stopping, scheduler for model has stopped accepting new inference requests" (2 of 16 in flight, seen
  with two preprocess instances). FusionClient(retries=N) retries all of these, and connection errors while the
  server is down.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.hostile import _jpeg, _png, hanks, scene
from bench.inputs import benchmark_pairs
from client.api import FusionClient, FusionServerError, is_retryable
from facefuse.procfs import stub_processes
from facefuse.watchdog import SELF_HEAL_ARGS, StubWatchdog
from tests.conftest import REPO_ROOT
from tests.servers import ManagedServer, is_ready

pytestmark = pytest.mark.live


def stub_dead(instance: str) -> str:
    """Triton's message for a request that met the dead stub of `instance` (e.g. preprocess_0_1)."""
    return f"Stub process '{instance}' is not healthy"
GENEROUS_S = 180.0  # bound on any single wait: the machine may be slow, but nothing may hang


@pytest.fixture(scope="module")
def server():
    log = REPO_ROOT / "out" / "test-faults-triton.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text("")
    managed = ManagedServer(log, extra=list(SELF_HEAL_ARGS))
    managed.start()
    yield managed
    managed.stop()


def client_for(server: ManagedServer, protocol: str, **kwargs: object) -> FusionClient:
    port = server.ports.grpc if protocol == "grpc" else server.ports.http
    return FusionClient(f"127.0.0.1:{port}", protocol, timeout_s=300, **kwargs)


def small_pair() -> tuple[bytes, bytes]:
    return _png(hanks()), _jpeg(scene())


def wait_for(condition, what: str, timeout_s: float = GENEROUS_S, step_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step_s)


def http_status(server: ManagedServer, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.http}{path}", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


class Stream:
    """Worker threads sending requests back to back until stopped; every outcome is kept with its times."""

    def __init__(self, server: ManagedServer, workers: int = 4, **client_kwargs: object) -> None:
        self.server, self.client_kwargs = server, client_kwargs
        self.results: list[tuple[float, float, str, object, int]] = []  # start, end, protocol, outcome, attempts
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._work, args=(("grpc", "http")[i % 2],), daemon=True)
                        for i in range(workers)]

    def _work(self, protocol: str) -> None:
        source, target = small_pair()
        with client_for(self.server, protocol, **self.client_kwargs) as client:
            while not self.done.is_set():
                started = time.monotonic()
                try:
                    outcome: object = client.fuse(source, target, 80, 80)
                except Exception as error:  # noqa: BLE001 - every outcome is recorded and judged by the test
                    outcome = error
                with self.lock:
                    self.results.append((started, time.monotonic(), protocol, outcome, client.attempts))

    def successes(self, after: float = 0.0) -> int:
        with self.lock:
            return sum(1 for start, _, _, outcome, _ in self.results
                       if start >= after and not isinstance(outcome, Exception))

    def failures(self) -> list[tuple[float, float, str, Exception, int]]:
        with self.lock:
            return [row for row in self.results if isinstance(row[3], Exception)]  # type: ignore[misc]

    def __enter__(self) -> Stream:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(GENEROUS_S)
            assert not thread.is_alive(), "a client request hung"


def test_graceful_shutdown_finishes_in_flight_requests(server):
    """SIGTERM with 1080p requests in flight: those inside a model complete, those between ensemble steps and new
    ones are refused retryably, exit 0."""
    server.ensure_fresh()
    watchdog = StubWatchdog(server.process.pid, f"127.0.0.1:{server.ports.http}", interval_s=0.2).start()
    # Sixteen different 1080p pairs (identical ones would be decoded and detected once per batch): ~2 s of work for
    # two preprocess instances on 2 cores, so the signal below finds them in flight.
    pairs = benchmark_pairs(16)

    def one(index: int) -> tuple[float, object]:
        with client_for(server, ("grpc", "http")[index % 2]) as client:
            try:
                outcome: object = client.fuse(*pairs[index], 100, 100)
            except Exception as error:  # noqa: BLE001
                outcome = error
        return time.monotonic(), outcome

    with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
        futures = [pool.submit(one, index) for index in range(len(pairs))]
        time.sleep(0.5)  # let them reach the server
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        time.sleep(0.2)
        late = []  # new requests while the server drains
        for protocol in ("grpc", "http"):
            with client_for(server, protocol) as client:
                try:
                    client.fuse(*small_pair())
                    late.append(None)
                except Exception as error:  # noqa: BLE001
                    late.append(error)
        results = [future.result(timeout=GENEROUS_S) for future in futures]
    returncode = server.wait(GENEROUS_S)
    watchdog.stop()
    # A request inside a model when the signal comes finishes; one between two steps of the ensemble meets a
    # composing model that no longer takes work: UNAVAILABLE / 503 "Server is stopping, scheduler for model has
    # stopped accepting new inference requests" (seen with 16 in flight), which FusionClient(retries=N) retries.
    errors = [outcome for _, outcome in results if isinstance(outcome, Exception)]
    print(f"{len(results) - len(errors)} in-flight requests finished, {len(errors)} refused:",
          [repr(error)[:120] for error in errors])
    assert all(isinstance(error, FusionServerError) and is_retryable(error) and "Server is stopping" in error.raw
               for error in errors), errors
    assert any(finished > signalled and not isinstance(outcome, Exception) for finished, outcome in results), \
        "no request in flight at the signal finished"
    assert returncode == 0
    assert watchdog.reloads == []  # stubs leaving with their models at shutdown are not deaths
    # Late requests: gRPC NOT_FOUND "... has no available versions", HTTP connection refused (or served if they
    # beat the drain), all of which FusionClient(retries=N) retries.
    print("late requests:", [repr(error)[:120] for error in late])
    assert all(error is None or is_retryable(error) for error in late), late


def test_client_retries_across_a_restart(server):
    """Clients with retries keep sending while the server is down and starts again on the same ports: every request
    succeeds from the client's view.

    After the graceful-shutdown test the server is already down, so the clients start against closed ports (one
    server start less). Run alone, the test first kills the running server under load (as a crash or an OOM kill
    would), cutting requests in flight. (A graceful stop under keep-alive HTTP clients is slow: Triton waits for
    their connections the whole --exit-timeout-secs, serving meanwhile, then exits 1.)
    """
    if server.tainted:
        server.kill()
    with Stream(server, workers=4, retries=100, backoff_s=0.2, max_backoff_s=2.0) as stream:
        if server.running:
            wait_for(lambda: stream.successes() >= 4, "requests before the crash")
            server.kill()
        down = time.monotonic()
        time.sleep(1.0)  # clients now meet closed ports
        server.start()
        restarted = time.monotonic()
        wait_for(lambda: stream.successes(after=restarted) >= 4, "requests after the restart")
    failures = stream.failures()
    assert not failures, [repr(error)[:200] for _, _, _, error, _ in failures]
    retried = [attempts for start, end, _, _, attempts in stream.results if attempts > 1]
    spanning = [1 for start, end, *_ in stream.results if start < restarted and end > down]
    print(f"{len(stream.results)} requests, {len(retried)} retried (max {max(retried, default=0)} attempts), "
          f"{len(spanning)} spanned the outage")
    assert retried, "no request met the outage"
    assert is_ready(server.ports)


def test_killed_stub_fails_requests_fast_and_the_watchdog_brings_it_back(server):
    server.ensure_fresh()
    pid = server.process.pid
    with Stream(server, workers=4) as stream:
        wait_for(lambda: stream.successes() >= 4, "requests before the kill")
        instances = [stub for stub in stub_processes(pid).values() if stub.model == "preprocess"]
        assert len(instances) >= 2  # config.pbtxt: two preprocess instances on a CPU host
        victim = instances[0]
        os.kill(victim.pid, signal.SIGKILL)
        dead_message = stub_dead(victim.instance)
        server.tainted = True  # its graceful exit would now wait out --exit-timeout-secs
        killed = time.monotonic()

        def failed_on_the_dead_stub(after: float) -> bool:
            return any(dead_message in error.raw for start, _, _, error, _ in stream.failures()
                       if isinstance(error, FusionServerError) and start >= after)

        wait_for(lambda: failed_on_the_dead_stub(killed), "a request failing on the dead stub")
        # Triton alone: no restart, it still calls itself (and the model) ready, and it keeps handing requests to
        # the dead instance while the other one serves.
        time.sleep(3.0)
        alive = {stub.instance for stub in stub_processes(pid).values() if stub.model == "preprocess"}
        assert victim.instance not in alive and len(alive) == len(instances) - 1
        assert http_status(server, "/v2/health/ready") == 200
        assert http_status(server, "/v2/models/preprocess/ready") == 200
        wait_for(lambda: failed_on_the_dead_stub(killed + 3.0), "the dead stub still given requests")
        # A watchdog started now never saw the dead stub: it finds the model one stub short of its instances and
        # reloads it in place.
        watchdog = StubWatchdog(pid, f"127.0.0.1:{server.ports.http}", interval_s=0.5).start()
        try:
            wait_for(lambda: bool(watchdog.reloads), "the watchdog's reload")
            reloaded = time.monotonic()
            wait_for(lambda: stream.successes(after=reloaded) >= 4, "requests after the reload")
        finally:
            watchdog.stop()
    failures = stream.failures()
    for start, end, protocol, error, _ in failures:
        assert isinstance(error, FusionServerError), repr(error)
        assert dead_message in error.raw, error.raw
        assert error.status == ("StatusCode.INTERNAL" if protocol == "grpc" else "500"), error.status
        assert end - start < GENEROUS_S
    assert [(reload.model, reload.ok) for reload in watchdog.reloads] == [("preprocess", True)]
    new = [stub for stub in stub_processes(pid).values() if stub.model == "preprocess"]
    assert len(new) == len(instances) and victim.pid not in {stub.pid for stub in new}
    print(f"{len(failures)} requests failed on the dead stub (slowest {max(e - s for s, e, *_ in failures):.1f} s); "
          f"reload took {watchdog.reloads[0].seconds:.1f} s")
    for protocol in ("grpc", "http"):
        with client_for(server, protocol) as client:
            assert client.fuse(*small_pair()).image
    assert is_ready(server.ports)

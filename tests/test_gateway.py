"""The API gateway (gateway/, Debian's nginx) in front of the real local Triton, over HTTP and gRPC.

nginx runs as a foreground child on free ports with its config, logs and temp files in a temporary folder; Triton is
the session's server (tests/conftest.py), started with the restricted-API flags that docker compose uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from client.api import FusionClient, FusionServerError
from facefuse import errors
from facefuse.imaging import decode_image
from facefuse.local_server import ADMIN_HEADER
from gateway.render import GatewaySettings, parse_keys, render
from tests.conftest import REPO_ROOT, _free_port, require_nginx

pytestmark = pytest.mark.live
PROTOCOLS = ("grpc", "http")
# Rates for the tests: generous for the keys whose requests must pass, 1 r/s with a burst of 2 for the keys whose
# bursts must be refused (one per protocol, so each test starts with a full bucket).
KEYS = {
    "alice": ("alice-0123456789-abcdefghij-KLMNOP", "100r/s", "burst=50"),
    "boss": ("boss-0123456789-abcdefghij-KLMNOPQ", "100r/s", "burst=50 admin"),
    "slow_grpc": ("slowgrpc-0123456789-abcdefghij-KL", "1r/s", "burst=2"),
    "slow_http": ("slowhttp-0123456789-abcdefghij-KL", "1r/s", "burst=2"),
}
WRONG_KEYS = {"none": None, "unknown": "not-a-key-0123456789-abcdefghij",
              "other case": KEYS["alice"][0].swapcase()}  # a key is case-sensitive


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def gateway(triton_server, tmp_path_factory):
    nginx = require_nginx()
    folder = tmp_path_factory.mktemp("gateway")
    (folder / "tmp").mkdir()
    keys_file = folder / "keys"
    keys_file.write_text("".join(f"{name} {key} {rate} {flags}\n" for name, (key, rate, flags) in KEYS.items()))
    http_port, grpc_port = _free_port(), _free_port()
    ports = triton_server["ports"]
    settings = GatewaySettings(
        admin_secret=triton_server["admin_secret"], http_listen=f"127.0.0.1:{http_port}",
        grpc_listen=f"127.0.0.1:{grpc_port}", triton_http=f"127.0.0.1:{ports.http}",
        triton_grpc=f"127.0.0.1:{ports.grpc}", max_body="8m", worker_processes="1",
        # Workers of a root master run as `nobody` unless told otherwise, and could not write the 0700 temp folder.
        user="root" if os.geteuid() == 0 else None,
        pid=str(folder / "nginx.pid"), error_log=str(folder / "error.log"), access_log=str(folder / "access.log"),
        temp_dir=str(folder / "tmp"))
    config = folder / "nginx.conf"
    config.write_text(render(parse_keys(keys_file.read_text()), settings))
    output = open(folder / "nginx.out", "wb")  # noqa: SIM115 - handed to the child process
    process = subprocess.Popen([nginx, "-p", str(folder), "-c", str(config)], stdout=output,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 15
    while not (_accepts(http_port) and _accepts(grpc_port)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            logs = [path.read_text(errors="replace") for path in (folder / "nginx.out", folder / "error.log")
                    if path.exists()]
            pytest.fail(f"nginx did not start (exit {process.returncode}):\n" + "\n".join(logs))
        time.sleep(0.05)
    yield {"http": http_port, "grpc": grpc_port, "folder": folder, "config": config, "triton": triton_server}
    process.send_signal(signal.SIGQUIT)  # graceful: finish open requests, then exit
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    output.close()


def gateway_url(gateway, protocol: str) -> str:
    return f"127.0.0.1:{gateway[protocol]}"


def key(name: str) -> str:
    return KEYS[name][0]


def expected_status(protocol: str, http: int, grpc: str) -> str:
    return str(http) if protocol == "http" else f"StatusCode.{grpc}"


def http_request(gateway, path: str, method: str = "GET", api_key: str | None = None,
                 headers: dict[str, str] | None = None, port: int | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port or gateway['http']}{path}", method=method,
                                     data=b"{}" if method == "POST" else None, headers=dict(headers or {}))
    if api_key:
        request.add_header("x-api-key", api_key)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# --- keys --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrong", list(WRONG_KEYS))
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_missing_or_wrong_key_is_unauthenticated(gateway, protocol, wrong, hanks_png, group_jpg):
    with FusionClient(gateway_url(gateway, protocol), protocol, api_key=WRONG_KEYS[wrong]) as client, \
            pytest.raises(FusionServerError) as caught:
        client.fuse(hanks_png, group_jpg)
    error = caught.value
    print(f"{protocol} {wrong} key: status {error.status}, {error.raw}")
    assert error.status == expected_status(protocol, 401, "UNAUTHENTICATED")
    assert error.code == errors.UNAUTHENTICATED and "x-api-key" in error.message


def test_http_401_is_json_with_a_challenge(gateway):
    status, headers, body = http_request(gateway, "/v2/models/face_fusion")
    assert status == 401
    assert headers["Content-Type"] == "application/json" and "x-api-key" in headers["WWW-Authenticate"]
    assert json.loads(body)["error"].startswith("UNAUTHENTICATED: ")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_good_key_gets_a_fused_image(gateway, protocol, hanks_png, group_jpg):
    with FusionClient(gateway_url(gateway, protocol), protocol, api_key=key("alice")) as client:
        assert client.is_ready()
        result = client.fuse(hanks_png, group_jpg, 100, 100, {"format": "png", "watermark_id": "9a7e"})
    assert result.image.startswith(b"\x89PNG")
    fused, target = decode_image(result.image), decode_image(group_jpg)
    assert fused.shape == target.shape
    assert np.abs(fused.astype(float) - target.astype(float)).mean() > 0.1
    assert result.metadata["watermark_id"] == "0000000000009a7e"
    print(f"{protocol}: fused {len(result.image)} bytes through the gateway")


def test_health_stays_open(gateway):
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert http_request(gateway, path)[0] == 200
    with FusionClient(gateway_url(gateway, "grpc"), "grpc") as client:  # gRPC ServerReady, no key
        assert client.is_ready()


def test_the_key_never_reaches_triton_and_the_access_log_names_the_client(gateway):
    status, _, _ = http_request(gateway, "/v2/models/face_fusion", api_key=key("alice"))
    assert status == 200
    log = (gateway["folder"] / "access.log").read_text()
    assert " alice [" in log and key("alice") not in log


# --- rate limits --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_burst_over_the_rate_is_refused_then_recovers(gateway, protocol, group_jpg):
    """Requests are cheap INVALID_IMAGE failures from Triton: they show which requests got through the gateway."""
    name = f"slow_{protocol}"

    def attempt(_: int = 0) -> FusionServerError:
        # One client per thread: tritonclient's HTTP client (gevent) must stay on the thread that made it.
        with FusionClient(gateway_url(gateway, protocol), protocol, api_key=key(name)) as client, \
                pytest.raises(FusionServerError) as caught:
            client.fuse(b"not an image", group_jpg)
        return caught.value

    # All at once, so that how fast Triton answers cannot refill the bucket during the burst.
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    passed = [error for error in outcomes if error.code == errors.INVALID_IMAGE]
    limited = [error for error in outcomes if error.code == errors.RATE_LIMITED]
    print(f"{protocol}: {len(passed)} of 8 reached Triton, {len(limited)} refused with "
          f"{sorted({error.status for error in limited})}")
    assert len(passed) + len(limited) == 8, [error.raw for error in outcomes]
    assert 1 <= len(passed) <= 4 and len(limited) >= 4  # 1 r/s, burst 2
    assert {error.status for error in limited} == {expected_status(protocol, 429, "RESOURCE_EXHAUSTED")}
    # Another key is not affected by this one's limit.
    with FusionClient(gateway_url(gateway, protocol), protocol, api_key=key("alice")) as other, \
            pytest.raises(FusionServerError) as caught:
        other.fuse(b"not an image", group_jpg)
    assert caught.value.code == errors.INVALID_IMAGE
    time.sleep(1.2)  # one request's worth of rate refills
    assert attempt().code == errors.INVALID_IMAGE


def test_http_429_says_when_to_retry(gateway):
    statuses = [http_request(gateway, "/v2/health/ready", api_key=None)[0] for _ in range(3)]
    assert statuses == [200, 200, 200]  # the open endpoints have their own per-address limit (20 r/s, burst 20)
    # slow_http's bucket may still hold the previous test's requests: drain it and check the answer's headers.
    answers = [http_request(gateway, "/v2/models/face_fusion", api_key=key("slow_http")) for _ in range(5)]
    status, headers, body = answers[-1]
    assert status == 429 and headers["Retry-After"] == "1"
    assert json.loads(body)["error"].startswith("RATE_LIMITED: ")


# --- restricted APIs ----------------------------------------------------------------------------------------------


RESTRICTED_HTTP = [("POST", "/v2/repository/index"), ("GET", "/v2/models/face_fusion/config"),
                   ("GET", "/v2/models/face_fusion/stats"), ("GET", "/v2/logging"),
                   ("GET", "/v2/systemsharedmemory/status"), ("GET", "/v2/trace/setting")]


@pytest.mark.parametrize(("method", "path"), RESTRICTED_HTTP)
def test_http_restricted_apis_need_an_admin_key(gateway, method, path):
    assert http_request(gateway, path, method)[0] == 401
    status, _, body = http_request(gateway, path, method, api_key=key("alice"))
    assert status == 403 and json.loads(body)["error"].startswith("PERMISSION_DENIED: ")
    # A client cannot make itself admin by sending Triton's header: the gateway replaces it.
    status, _, _ = http_request(gateway, path, method, api_key=key("alice"),
                                headers={ADMIN_HEADER: gateway["triton"]["admin_secret"]})
    assert status == 403
    status, _, body = http_request(gateway, path, method, api_key=key("boss"))
    assert status == 200, body
    if path == "/v2/repository/index":
        assert {"face_fusion", "preprocess", "fusion", "postprocess"} <= {model["name"] for model in json.loads(body)}


def test_grpc_restricted_apis_need_an_admin_key(gateway):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(gateway_url(gateway, "grpc"))
    calls = {
        "RepositoryIndex": lambda headers: client.get_model_repository_index(headers=headers),
        "ModelConfig": lambda headers: client.get_model_config("face_fusion", headers=headers),
        "ModelStatistics": lambda headers: client.get_inference_statistics(headers=headers),
        "LogSettings": lambda headers: client.get_log_settings(headers=headers),
        "SystemSharedMemoryStatus": lambda headers: client.get_system_shared_memory_status(headers=headers),
        "TraceSetting": lambda headers: client.get_trace_settings(headers=headers),
    }
    forged = {"x-api-key": key("alice"), f"triton-grpc-protocol-{ADMIN_HEADER}": gateway["triton"]["admin_secret"]}
    for method, call in calls.items():
        for headers, status in ((None, "UNAUTHENTICATED"), ({"x-api-key": key("alice")}, "PERMISSION_DENIED"),
                                (forged, "PERMISSION_DENIED")):
            with pytest.raises(InferenceServerException) as caught:
                call(headers)
            assert caught.value.status() == f"StatusCode.{status}", (method, caught.value.message())
        call({"x-api-key": key("boss")})  # allowed
    index = client.get_model_repository_index(headers={"x-api-key": key("boss")})
    assert "face_fusion" in {model.name for model in index.models}
    client.close()


def test_triton_itself_enforces_the_restriction(gateway):
    """Behind the gateway or not, Triton (started like docker compose starts it) refuses without its admin header."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    triton = gateway["triton"]
    secret = triton["admin_secret"]
    direct = triton["ports"].http
    assert http_request(gateway, "/v2/repository/index", "POST", port=direct)[0] == 403
    assert http_request(gateway, "/v2/repository/index", "POST", port=direct, headers={ADMIN_HEADER: "x"})[0] == 403
    assert http_request(gateway, "/v2/repository/index", "POST", port=direct, headers={ADMIN_HEADER: secret})[0] == 200
    assert http_request(gateway, "/v2/models/face_fusion", port=direct)[0] == 200  # metadata stays open
    client = grpcclient.InferenceServerClient(f"localhost:{triton['ports'].grpc}")
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_repository_index()
    assert "restricted" in caught.value.message()
    client.get_model_repository_index(headers={f"triton-grpc-protocol-{ADMIN_HEADER}": secret})
    client.close()


def test_grpc_streaming_is_not_offered(gateway):
    """One stream could carry any number of inferences past a per-request rate limit."""
    import queue

    import tritonclient.grpc as grpcclient

    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(gateway_url(gateway, "grpc"))
    client.start_stream(callback=lambda result, error: answers.put(error), headers={"x-api-key": key("alice")})
    tensor = grpcclient.InferInput("OPTIONS", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"{}"]], dtype=object))
    # The refusal may already have closed the stream (then this raises); the callback has the status either way.
    with contextlib.suppress(Exception):
        client.async_stream_infer("face_fusion", [tensor])
    error = answers.get(timeout=10)
    client.stop_stream()
    client.close()
    assert error is not None and error.status() == "StatusCode.UNIMPLEMENTED", error


# --- limits and the CLI --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_request_over_the_body_limit(gateway, protocol, group_jpg):
    with FusionClient(gateway_url(gateway, protocol), protocol, api_key=key("alice")) as client, \
            pytest.raises(FusionServerError) as caught:
        client.fuse(b"\xff" * (9 << 20), group_jpg)  # the test gateway allows 8 MiB
    assert caught.value.code == errors.REQUEST_TOO_LARGE
    assert caught.value.status == expected_status(protocol, 413, "RESOURCE_EXHAUSTED")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_takes_the_key_from_the_flag_or_the_environment(gateway, protocol, tmp_path):
    from facefuse.samples import sample_image_path

    command = [sys.executable, "-m", "client", "fuse", "--protocol", protocol, "--url", gateway_url(gateway, protocol),
               "--source", str(sample_image_path("Tom_Hanks_54745.png")), "--target",
               str(sample_image_path("t1.jpg")), "--out", str(tmp_path / "out.jpg")]
    environment = {name: value for name, value in os.environ.items() if name != "FACEFUSE_API_KEY"}
    refused = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=environment)
    assert refused.returncode == 2 and "UNAUTHENTICATED: " in refused.stderr
    if protocol == "grpc":
        ok = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**environment, "FACEFUSE_API_KEY": key("alice")})
    else:
        ok = subprocess.run([*command, "--api-key", key("alice")], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=environment)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out.jpg").read_bytes().startswith(b"\xff\xd8")

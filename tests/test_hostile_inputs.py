"""Malformed and hostile inputs against the live server, over gRPC and HTTP: every case gets its stable code (or a
correct result), and after every case the server is still ready and no Python stub died or logged a traceback.

The catalogue of encoded inputs lives in bench/hostile.py (the soak reuses it); the wire-level cases below (shapes,
dtypes, batch sizes, lying length prefixes) go around FusionClient with raw gRPC / HTTP requests. The last test
writes the catalogue with each case's outcome per protocol to out/hostile_catalogue.md.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest

from bench.hostile import OK, HostileCase, build_catalogue, check_result, hanks, preprocess_limits, scene
from client.api import FusionClient, FusionServerError
from facefuse import errors
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.live
PROTOCOLS = ("grpc", "http")
CATALOGUE = {case.name: case for case in build_catalogue(preprocess_limits())}
# The rows one request may carry: the ensemble's max_batch_size (also preprocess's and postprocess's).
MAX_ROWS = int(re.search(r"max_batch_size: (\d+)",
                         (REPO_ROOT / "model_repository" / "face_fusion" / "config.pbtxt").read_text()).group(1))
# Lines that must not appear in the server log while a case runs: a dead or restarted Python stub, or an unexpected
# exception in our model code (triton_glue.error_response logs those with their traceback).
BAD_LOG_MARKERS = ("Stub process", "unhealthy", "Traceback")
OUTCOMES: dict[tuple[str, str], str] = {}  # (case, protocol) -> what the server answered, for the table
WHAT: dict[str, str] = {name: case.what for name, case in CATALOGUE.items()}
EXPECTED: dict[str, str] = {name: case.expect for name, case in CATALOGUE.items()}


class ServerWatch:
    """Marks the server log before a case; afterwards checks readiness and the log lines written meanwhile."""

    def __init__(self, server: dict) -> None:
        self.server = server
        self.offset = server["log"].stat().st_size

    def assert_healthy(self) -> None:
        assert self.server["process"].poll() is None, "the server exited"
        url = f"http://127.0.0.1:{self.server['ports'].http}/v2/health/ready"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
        with open(self.server["log"], "rb") as log:
            log.seek(self.offset)
            new = log.read().decode(errors="replace")
        bad = [line for line in new.splitlines() if any(marker in line for marker in BAD_LOG_MARKERS)]
        assert not bad, "server log:\n" + "\n".join(bad[:20])


@pytest.fixture
def watch(triton_server):
    watcher = ServerWatch(triton_server)
    yield watcher
    watcher.assert_healthy()


def make_client(server: dict, protocol: str) -> FusionClient:
    port = server["ports"].grpc if protocol == "grpc" else server["ports"].http
    return FusionClient(f"127.0.0.1:{port}", protocol, timeout_s=300)


def _summary(image: bytes) -> str:
    from facefuse.imaging import image_size

    width, height = image_size(image)
    return f"OK {width}x{height}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", list(CATALOGUE))
def test_hostile_input(triton_server, watch, protocol, name):
    case: HostileCase = CATALOGUE[name]
    with make_client(triton_server, protocol) as client:
        try:
            result = client.fuse(case.source, case.target, case.face_degree, case.profile_degree, case.options)
        except FusionServerError as error:
            OUTCOMES[name, protocol] = error.code or f"{error.status}: {error.raw[:80]}"
            assert case.expect != OK, f"expected a result, got {error.raw}"
            assert error.code == case.expect, error.raw
            # Triton's ensemble scheduler prefixes "in ensemble 'face_fusion', "; our message starts with the code.
            assert re.match(rf"^(in ensemble 'face_fusion', )?{case.expect}: \S", error.raw), error.raw
            assert error.status in ("StatusCode.INVALID_ARGUMENT", "400"), error.status  # a client error
            return
    OUTCOMES[name, protocol] = _summary(result.image)
    assert case.expect == OK, f"expected {case.expect}, got a result"
    assert not check_result(case, result.image, result.metadata)


# --- wire level: tensors FusionClient would never send -----------------------------------------------------------

TRITON_REFUSAL = "TRITON_REFUSAL"  # Triton's own INVALID_ARGUMENT / HTTP 400 before any model runs
NAMES = ("SOURCE_IMAGE", "TARGET_IMAGE", "FACE_DEGREE", "PROFILE_DEGREE", "OPTIONS")


def _element(data: bytes) -> bytes:
    """One BYTES element in Triton's serialisation: a little-endian uint32 length, then the bytes."""
    return struct.pack("<I", len(data)) + data


@dataclass
class WireInput:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes


@dataclass
class WireCase:
    name: str
    what: str
    inputs: list[WireInput]
    expect: str  # TRITON_REFUSAL, an error code, or OK
    rows: int = 1  # OK: rows of FUSED_IMAGE expected
    protocols: tuple[str, ...] = PROTOCOLS
    message: str = ""  # a fragment Triton's refusal must contain
    http_body: bytes | None = field(default=None, repr=False)  # HTTP only: a body sent as it is


def _standard(rows: int = 1, source: bytes | None = None, bad_last_row: bool = False) -> list[WireInput]:
    from bench.hostile import _jpeg, _png

    images = {"SOURCE_IMAGE": source or _png(hanks()), "TARGET_IMAGE": _jpeg(scene()), "OPTIONS": b"{}"}
    inputs = []
    for name in NAMES:
        if name.endswith("DEGREE"):
            inputs.append(WireInput(name, "FP32", [rows, 1], np.full(rows, 50.0, np.float32).tobytes()))
        else:
            values = [images[name]] * rows
            if bad_last_row and name == "SOURCE_IMAGE":
                values[-1] = b"junk"
            inputs.append(WireInput(name, "BYTES", [rows, 1], b"".join(_element(v) for v in values)))
    return inputs


def _replace(inputs: list[WireInput], name: str, **changes: object) -> list[WireInput]:
    return [WireInput(**{**item.__dict__, **changes}) if item.name == name else item for item in inputs]


def wire_cases() -> list[WireCase]:
    base = _standard()
    source = base[0].raw
    return [
        WireCase("empty_batch", "every input with batch dimension 0", [
            WireInput(item.name, item.datatype, [0, 1], b"") for item in base], TRITON_REFUSAL),
        WireCase("rank_1_shape", "shape [1] instead of [1, 1]",
                 [WireInput(item.name, item.datatype, [1], item.raw) for item in base], TRITON_REFUSAL,
                 message="unexpected shape"),
        WireCase("shape_1x2", "SOURCE_IMAGE of shape [1, 2] (two images)",
                 _replace(base, "SOURCE_IMAGE", shape=[1, 2], raw=source + source), TRITON_REFUSAL,
                 message="unexpected shape"),
        WireCase("dtype_fp64", "FACE_DEGREE sent as FP64",
                 _replace(base, "FACE_DEGREE", datatype="FP64", raw=np.float64(50).tobytes()), TRITON_REFUSAL,
                 message="data-type"),
        WireCase("missing_options", "no OPTIONS input", [item for item in base if item.name != "OPTIONS"],
                 TRITON_REFUSAL, message="missing required input"),
        WireCase("unknown_input", "an extra input ADMIN",
                 [*base, WireInput("ADMIN", "BYTES", [1, 1], _element(b"1"))], TRITON_REFUSAL),
        WireCase("batch_too_large", f"{MAX_ROWS + 1} rows (max_batch_size is {MAX_ROWS})", _standard(rows=MAX_ROWS + 1),
                 TRITON_REFUSAL, message=f"batch-size must be <= {MAX_ROWS}"),
        WireCase("mismatched_batch", "SOURCE_IMAGE with 2 rows, the rest with 1",
                 _replace(base, "SOURCE_IMAGE", shape=[2, 1], raw=source + source), TRITON_REFUSAL,
                 message="batch size does not match"),
        WireCase("length_prefix_lies", "BYTES element claiming 1,000,000 bytes, carrying 3",
                 _replace(base, "SOURCE_IMAGE", raw=struct.pack("<I", 1_000_000) + b"abc"), TRITON_REFUSAL,
                 message="incomplete string data"),
        WireCase("length_prefix_cut", "BYTES element with a 2-byte length prefix",
                 _replace(base, "SOURCE_IMAGE", raw=b"\x05\x00"), TRITON_REFUSAL,
                 message="incomplete string length"),
        WireCase("two_elements_in_one_slot", "two BYTES elements for a [1, 1] input",
                 _replace(base, "SOURCE_IMAGE", raw=source + source), TRITON_REFUSAL,
                 message="unexpected number of string elements"),
        WireCase("fp32_two_bytes", "FACE_DEGREE with 2 bytes of data",
                 _replace(base, "FACE_DEGREE", raw=b"\x00\x00"), TRITON_REFUSAL, message="byte size mismatch"),
        # A request's rows succeed or fail together: one bad row fails the whole request with its code.
        WireCase("two_rows_one_bad", "one request of 2 rows, the second source is junk",
                 _standard(rows=2, bad_last_row=True), errors.INVALID_IMAGE),
        WireCase("two_rows_ok", "one request of 2 valid rows", _standard(rows=2), OK, rows=2),
        WireCase("http_body_not_json", "an HTTP body that is not JSON", [], TRITON_REFUSAL, protocols=("http",),
                 http_body=b"{not json"),
    ]


WIRE = {case.name: case for case in wire_cases()}
WHAT.update({f"wire:{name}": case.what for name, case in WIRE.items()})
EXPECTED.update({f"wire:{name}": case.expect for name, case in WIRE.items()})


def send_grpc(server: dict, case: WireCase) -> tuple[bool, str, list[list[int]]]:
    """(ok, status and message, output shapes) of one raw ModelInfer call."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="face_fusion")
    for item in case.inputs:
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = item.name, item.datatype
        tensor.shape.extend(item.shape)
        request.raw_input_contents.append(item.raw)
    options = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
    with grpc.insecure_channel(f"127.0.0.1:{server['ports'].grpc}", options=options) as channel:
        try:
            response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=300)
        except grpc.RpcError as error:
            return False, f"{error.code()}: {error.details()}", []
    return True, "OK", [list(output.shape) for output in response.outputs]


def send_http(server: dict, case: WireCase) -> tuple[bool, str, list[list[int]]]:
    """(ok, status and message, output shapes) of one raw POST with binary tensor data."""
    if case.http_body is not None:
        body, headers = case.http_body, {"Content-Type": "application/json"}
    else:
        header = json.dumps({
            "inputs": [{"name": item.name, "shape": item.shape, "datatype": item.datatype,
                        "parameters": {"binary_data_size": len(item.raw)}} for item in case.inputs],
            "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in ("FUSED_IMAGE", "METADATA")],
        }).encode()
        body = header + b"".join(item.raw for item in case.inputs)
        headers = {"Inference-Header-Content-Length": str(len(header))}
    request = urllib.request.Request(f"http://127.0.0.1:{server['ports'].http}/v2/models/face_fusion/infer",
                                     data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            length = int(response.headers.get("Inference-Header-Content-Length") or 0)
            payload = response.read()
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):  # Triton's {"error": ...}, else the raw text
            text = json.loads(text)["error"]
        return False, f"{error.code}: {text}", []
    answer = json.loads(payload[:length] if length else payload)
    return True, "OK", [output["shape"] for output in answer["outputs"]]


def _short_refusal(answer: str) -> str:
    """`StatusCode.INVALID_ARGUMENT: [request id: <id_unknown>] unexpected shape ...` -> `INVALID_ARGUMENT:
    unexpected shape ...`, short enough for the table."""
    status, _, message = answer.partition(": ")
    message = re.sub(r"^(\[request id: [^]]*\] |in ensemble 'face_fusion', )+", "", message)
    text = f"{status.removeprefix('StatusCode.')}: {message}"
    return text if len(text) <= 64 else text[:61] + "..."


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", list(WIRE))
def test_wire_level_input(triton_server, watch, protocol, name):
    case = WIRE[name]
    if protocol not in case.protocols:
        pytest.skip(f"{name} is {'/'.join(case.protocols)} only")
    ok, answer, shapes = (send_grpc if protocol == "grpc" else send_http)(triton_server, case)
    code = errors.split_error_message(answer)[0]
    OUTCOMES[f"wire:{name}", protocol] = (f"OK {len(shapes)} outputs x {shapes[0][0]} rows" if ok
                                          else code or _short_refusal(answer))
    if case.expect == OK:
        assert ok, answer
        assert shapes == [[case.rows, 1], [case.rows, 1]]
        return
    assert not ok, "expected a refusal"
    if case.expect == TRITON_REFUSAL:
        assert not code, answer  # refused by Triton itself, before our models
        assert answer.startswith(("StatusCode.INVALID_ARGUMENT", "400", "500")), answer
        assert case.message in answer
    else:
        assert code == case.expect, answer


def test_zz_catalogue_table(triton_server):
    """Write the catalogue (case, what it is, expected, outcome per protocol) to out/hostile_catalogue.md."""
    rows = ["| case | input | expected | gRPC | HTTP |", "|---|---|---|---|---|"]
    for name in [*CATALOGUE, *(f"wire:{name}" for name in WIRE)]:
        outcomes = [OUTCOMES.get((name, protocol), "-") for protocol in PROTOCOLS]
        expected = EXPECTED[name].replace(TRITON_REFUSAL, "Triton refusal")
        rows.append(f"| {name} | {WHAT[name]} | {expected} | {' | '.join(outcomes)} |")
    table = "\n".join(rows)
    path = REPO_ROOT / "out" / "hostile_catalogue.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text("# Hostile-input catalogue (tests/test_hostile_inputs.py)\n\n" + table + "\n")
    print("\n" + table)
    assert OUTCOMES, "no case ran"


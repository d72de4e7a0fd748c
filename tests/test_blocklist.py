"""Identity blocklist: descriptors, the .npz file, the threshold, preprocess's check, and a live server with the
blocklist and consent turned on (gRPC and HTTP)."""

from __future__ import annotations

import re
import shutil
import urllib.request

import numpy as np
import pytest

from client.api import FusionClient, FusionServerError
from facefuse import errors, identity
from facefuse.blocklist import (
    DEFAULT_THRESHOLD,
    Blocklist,
    IdentityGuard,
    build_blocklist,
    main,
    resolve_path,
)
from facefuse.detection import FaceDetector
from facefuse.errors import FusionError
from facefuse.imaging import decode_image
from facefuse.label import label_layout
from facefuse.local_server import MODEL_REPOSITORY, Ports, free_ports, start, stop_process
from facefuse.samples import sample_image_path
from tests.conftest import REPO_ROOT, encode

HANKS = "Tom_Hanks_54745.png"


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


@pytest.fixture(scope="module")
def faces(detector, hanks_png, group_jpg):
    """(name, rgb, MTCNN face) for Tom Hanks and the 6 people of t1.jpg."""
    hanks = decode_image(hanks_png)
    group = decode_image(group_jpg)
    return [("hanks", hanks, detector.detect(hanks)[0])] + [
        (f"t1-{index}", group, face) for index, face in enumerate(detector.detect(group))]


@pytest.fixture(scope="module")
def descriptors(faces):
    return {name: identity.face_descriptor(rgb, face.box) for name, rgb, face in faces}


# -- descriptors ------------------------------------------------------------------------------------------------

def test_descriptor_is_128_finite_floats(descriptors):
    for descriptor in descriptors.values():
        assert descriptor.shape == (identity.DESCRIPTOR_SIZE,) and descriptor.dtype == np.float32
        assert np.isfinite(descriptor).all() and 1.0 < np.linalg.norm(descriptor) < 2.5  # dlib's: about 1.5


def test_same_person_is_near_and_others_are_far(detector, faces, descriptors):
    hanks = faces[0][1]
    for variant in (np.ascontiguousarray(hanks[:, ::-1]), decode_image(encode(hanks, "JPEG"))):
        face = detector.detect(variant)[0]
        assert identity.descriptor_distance(identity.face_descriptor(variant, face.box),
                                            descriptors["hanks"]) < DEFAULT_THRESHOLD - 0.15
    names = list(descriptors)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert identity.descriptor_distance(descriptors[first], descriptors[second]) > DEFAULT_THRESHOLD + 0.05


def test_descriptor_agrees_with_dlibs_own_pipeline(faces, descriptors):
    """Shape predictor in our MTCNN box vs dlib's HOG box (the evaluation's judge): the same identity vector."""
    from evaluation import dlib_models

    gaps = [identity.descriptor_distance(descriptors[name], dlib_models.descriptor(rgb, face.box))
            for name, rgb, face in faces]
    assert np.mean(gaps) < 0.12 and max(gaps) < 0.3, gaps  # measured: mean 0.08, max 0.22 (a turned face)


def test_evaluation_reuses_the_one_loader():
    from evaluation import dlib_models

    assert dlib_models.face_recognizer is identity.face_recognizer
    assert dlib_models.shape_predictor_5 is identity.shape_predictor_5
    assert dlib_models.model_path("resnet") == identity.model_path("resnet")


# -- the file -----------------------------------------------------------------------------------------------------

def test_make_blocklist_builds_from_a_folder(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sample_image_path(HANKS), photos / HANKS)
    shutil.copy(sample_image_path("t1.jpg"), photos / "group.JPG")
    (photos / "broken.png").write_bytes(b"not an image")
    (photos / "notes.txt").write_text("ignored: not a photo suffix")
    out = tmp_path / "nested" / "blocklist.npz"
    assert main([str(photos), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 photo(s)" in printed and "added 'Tom_Hanks_54745'" in printed and "broken.png: skipped" in printed
    assert "5 smaller face(s) ignored" in printed and f"wrote {out}" in printed
    blocklist = Blocklist.load(out)
    assert blocklist.names == ("Tom_Hanks_54745", "group")
    assert blocklist.descriptors.shape == (2, 128) and blocklist.threshold == DEFAULT_THRESHOLD
    assert blocklist.model == identity.MODEL_NAME


def test_save_load_round_trip_and_refusals(tmp_path):
    rng = np.random.default_rng(0)
    original = Blocklist(("a", "b"), rng.normal(size=(2, 128)).astype(np.float32), 0.45, identity.MODEL_NAME)
    path = original.save(tmp_path / "b.npz")
    assert path == tmp_path / "b.npz"
    loaded = Blocklist.load(path)
    assert loaded.names == original.names and loaded.threshold == 0.45
    assert np.array_equal(loaded.descriptors, original.descriptors)
    Blocklist((), np.zeros((0, 128)), 0.5, "another_model").save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="another_model"):
        Blocklist.load(tmp_path / "other.npz")
    np.savez(tmp_path / "partial.npz", names=np.array(["a"]), descriptors=np.zeros((1, 128)))
    with pytest.raises(ValueError, match="missing"):
        Blocklist.load(tmp_path / "partial.npz")
    np.savez(tmp_path / "pickled.npz", names=np.array([{"x": 1}], dtype=object), descriptors=np.zeros((1, 128)),
             threshold=0.5, model=identity.MODEL_NAME)
    with pytest.raises(ValueError):  # never unpickles a file's objects
        Blocklist.load(tmp_path / "pickled.npz")


@pytest.mark.parametrize("names,descriptors,threshold", [(("a",), np.zeros((2, 128)), 0.5),
                                                         (("a",), np.zeros((1, 128)), 0.0),
                                                         (("a",), np.zeros((1, 128)), 2.5),
                                                         (("a",), np.full((1, 128), np.nan), 0.5),
                                                         (("a",), np.zeros((1, 64)), 0.5)])
def test_bad_blocklists_are_refused(names, descriptors, threshold):
    with pytest.raises(ValueError):
        Blocklist(names, descriptors, threshold, identity.MODEL_NAME)


def test_threshold_behaviour():
    entries = np.eye(3, 128, dtype=np.float32)
    blocklist = Blocklist(("a", "b", "c"), entries, 0.5, identity.MODEL_NAME)
    direction = np.zeros(128, np.float32)
    direction[100] = 1.0
    assert blocklist.nearest(entries[1] + 0.49 * direction)[0] == 1
    assert blocklist.matches(entries[1] + 0.49 * direction)
    assert not blocklist.matches(entries[1] + 0.51 * direction)
    assert not blocklist.matches(direction)  # sqrt(2) from every entry
    assert Blocklist((), np.zeros((0, 128)), 0.5, identity.MODEL_NAME).nearest(direction) == (-1, float("inf"))


def test_relative_paths_resolve_against_the_repository_root(tmp_path):
    assert resolve_path(".cache/blocklist.npz") == REPO_ROOT / ".cache" / "blocklist.npz"
    assert resolve_path(tmp_path / "x.npz") == tmp_path / "x.npz"


# -- preprocess's check ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hanks_blocklist(tmp_path_factory, detector):
    blocklist, problems = build_blocklist([sample_image_path(HANKS)], detector)
    assert not problems and len(blocklist) == 1
    return blocklist.save(tmp_path_factory.mktemp("blocklist") / "hanks.npz")


def test_guard_refuses_the_blocked_face_without_naming_it(hanks_blocklist, faces):
    guard = IdentityGuard.from_file(hanks_blocklist)
    _, hanks, hanks_face = faces[0]
    with pytest.raises(FusionError) as caught:
        guard.check(hanks, hanks_face)
    assert caught.value.code == errors.BLOCKED_IDENTITY and caught.value.is_client_error
    assert "protected identity" in str(caught.value) and "hanks" not in str(caught.value).lower()
    for _, rgb, face in faces[1:]:
        guard.check(rgb, face)


def test_preprocessor_checks_only_the_source(hanks_blocklist, detector, hanks_png, group_jpg):
    from facefuse.face_mesh import FaceMesh
    from facefuse.pipeline import FusionRequest, PreparedFusion, Preprocessor

    preprocessor = Preprocessor(detector, FaceMesh(), identity_guard=IdentityGuard.from_file(hanks_blocklist))
    blocked, allowed = preprocessor.prepare_batch([FusionRequest(hanks_png, group_jpg, 50, 50, b"{}"),
                                                   FusionRequest(group_jpg, hanks_png, 50, 50, b"{}")])
    assert isinstance(blocked, FusionError) and blocked.code == errors.BLOCKED_IDENTITY
    assert isinstance(allowed, PreparedFusion) and allowed.metadata["timings_ms"]["identity"] > 0


# -- live: a second server with the blocklist and consent=required ------------------------------------------------

@pytest.fixture(scope="module")
def safety_server(tmp_path_factory, hanks_blocklist):
    onnx_path = MODEL_REPOSITORY / "fusion" / "1" / "model.onnx"
    if not onnx_path.exists():
        from build.export_onnx import export, simplify

        simplify(export(tmp_path_factory.mktemp("onnx") / "raw.onnx"), onnx_path)
    repository = tmp_path_factory.mktemp("safety") / "model_repository"
    shutil.copytree(MODEL_REPOSITORY, repository, ignore=shutil.ignore_patterns("__pycache__", "*.plan"))
    config = repository / "preprocess" / "config.pbtxt"
    text, found = re.subn(r'(key: "blocklist_path" value: \{ string_value: )""', rf'\1"{hanks_blocklist}"',
                          config.read_text())
    text, consent = re.subn(r'(key: "consent" value: \{ string_value: )"off"', r'\1"required"', text)
    assert found == consent == 1, "preprocess/config.pbtxt has no blocklist_path / consent parameter to set"
    config.write_text(text)
    ports = free_ports()
    log = REPO_ROOT / "out" / "test-triton-safety.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text("")
    process = start(ports, log, repository, timeout_s=300, quiet=True)
    yield ports
    stop_process(process)


def _ready(ports: Ports) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=10) as response:
        return response.status == 200


def _refused(client: FusionClient, source: bytes, target: bytes, options: dict, code: str) -> str:
    with pytest.raises(FusionServerError) as caught:
        client.fuse(source, target, 80, 80, options)
    error = caught.value
    assert error.code == code, error.raw
    assert re.match(rf"^(in ensemble 'face_fusion', )?{code}: \S", error.raw), error.raw
    return error.raw


@pytest.mark.live
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_live_blocklist_and_consent(safety_server, protocol, hanks_png, group_jpg):
    port = safety_server.grpc if protocol == "grpc" else safety_server.http
    with FusionClient(f"localhost:{port}", protocol, timeout_s=120) as client:
        message = _refused(client, hanks_png, group_jpg, {"consent": True}, errors.BLOCKED_IDENTITY)
        assert "hanks" not in message.lower()
        _refused(client, group_jpg, hanks_png, {}, errors.CONSENT_REQUIRED)
        _refused(client, group_jpg, hanks_png, {"consent": False}, errors.CONSENT_REQUIRED)
        _refused(client, hanks_png, group_jpg, {}, errors.CONSENT_REQUIRED)  # consent is checked first
        # Another person as the source, with consent: fused, even into a photo of the blocked person.
        result = client.fuse(group_jpg, hanks_png, 80, 80, {"consent": True, "format": "png", "visible_label": True})
        fused, target = decode_image(result.image), decode_image(hanks_png)
        assert fused.shape == target.shape
        assert result.metadata["timings_ms"]["identity"] > 0
        # postprocess drew its configured label in the default corner: a darkened box with white text.
        x1, y1, x2, y2 = label_layout(target.shape[1], target.shape[0]).box
        assert x2 > 0.9 * target.shape[1] and y2 > 0.9 * target.shape[0]  # bottom-right
        box = fused[y1:y2, x1:x2].astype(int)
        assert (box.min(axis=-1) > 200).sum() > 10 and np.median(box) < 0.6 * np.median(target[y1:y2, x1:x2])
    assert _ready(safety_server)

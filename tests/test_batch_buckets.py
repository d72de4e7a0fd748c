"""Power-of-two batch buckets (facefuse/batch_buckets.py): the sizes, padding that leaves real rows' outputs alone,
and warm-ups that run every shape the detector and the face mesh can later meet. Padding is switched on here on
the CPU (on a GPU host it is the default), so the shapes are the GPU's."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from facefuse import face_mesh
from facefuse.batch_buckets import BucketedNet, bucket_size, bucket_sizes, forward_in_bucket
from facefuse.detection import FaceDetector
from facefuse.face_mesh import FaceMesh
from facefuse.samples import sample_image_path


def test_bucket_sizes_are_the_powers_of_two_that_cover_a_batch():
    assert [bucket_size(count) for count in (0, 1, 2, 3, 4, 5, 31, 32, 33, 64)] == [1, 1, 2, 4, 4, 8, 32, 32, 64, 64]
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_sizes(48) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_sizes(1) == (1,)


class _Recorder:
    """Wraps a net and remembers the batch shapes it ran."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.shapes = net, []

    def __call__(self, batch: torch.Tensor):
        self.shapes.append(tuple(batch.shape))
        return self.net(batch)


def test_padding_runs_the_bucket_and_leaves_the_real_rows_outputs_alone():
    nets = FaceDetector()
    rng = np.random.default_rng(5)
    for net, shape in ((nets.pnet, (5, 3, 40, 52)), (nets.rnet, (5, 3, 24, 24)), (nets.onet, (5, 3, 48, 48))):
        batch = torch.from_numpy(rng.uniform(-1, 1, shape).astype(np.float32))
        recorder = _Recorder(net)
        with torch.inference_mode():
            padded, plain = forward_in_bucket(recorder, batch, pad=True), net(batch)
            unpadded_by_default = forward_in_bucket(recorder, batch)  # a CPU tensor is not padded unless asked
        assert [shape[0] for shape in recorder.shapes] == [8, 5]
        assert isinstance(padded, tuple) and len(padded) == len(plain)
        for got, want, default in zip(padded, plain, unpadded_by_default):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(default, want)


def test_mesh_warm_up_runs_every_bucket_and_a_padded_batch_lands_in_one():
    mesh = FaceMesh(runtime="torch")  # the PyTorch net's batches are under test (on the CPU "auto" is ONNX Runtime)
    assert mesh.warm_up() == ()  # not padded on the CPU by default: nothing to warm
    crops = np.asarray(Image.open(sample_image_path("Tom_Hanks_54745.png")).convert("RGB"))
    crops = np.stack([cv2.resize(crops, (256, 256))] * 5)
    points, presence = mesh.landmarks_and_presence(crops)
    mesh.pad_batches = True
    mesh.runner = BucketedNet(recorder := _Recorder(mesh.net), pad=True)
    assert mesh.warm_up() == bucket_sizes(face_mesh._MAX_BATCH)
    warmed = set(recorder.shapes)
    assert {shape[0] for shape in warmed} == set(bucket_sizes(face_mesh._MAX_BATCH))
    recorder.shapes.clear()
    padded_points, padded_presence = mesh.landmarks_and_presence(crops)
    assert recorder.shapes == [(8, 3, 192, 192)] and set(recorder.shapes) <= warmed
    np.testing.assert_allclose(padded_points, points, atol=1e-3)
    np.testing.assert_allclose(padded_presence, presence, atol=1e-5)


def test_detector_warm_up_runs_every_shape_a_device_batch_meets():
    detector = FaceDetector(max_side=320, images_on_device=True)
    assert detector.warm_up(((240, 320),)) == 0  # not padded on the CPU by default: nothing to warm
    photo = np.asarray(Image.open(sample_image_path("t1.jpg")).convert("RGB"))
    images = [cv2.resize(np.roll(photo, shift, axis=1), (320, 240)) for shift in (0, 40, 80)]
    expected = detector.detect_batch(images)
    detector.pad_batches = True
    recorders = {name: _Recorder(getattr(detector, name)) for name in ("pnet", "rnet", "onet")}
    detector.pnet = recorders["pnet"]
    detector._rnet, detector._onet = (BucketedNet(recorders[name], pad=True) for name in ("rnet", "onet"))
    passes = detector.warm_up(((240, 320),), largest_group=4)
    warmed = {name: set(recorder.shapes) for name, recorder in recorders.items()}
    assert passes == sum(len(shapes) for shapes in warmed.values())
    assert {shape[0] for shape in warmed["rnet"]} == set(bucket_sizes(detector._crop_step(24)))
    for recorder in recorders.values():
        recorder.shapes.clear()
    found = detector.detect_batch(images)
    assert sum(len(faces) for faces in found) >= 6  # the group photo's faces, so R-Net and O-Net ran
    for name, recorder in recorders.items():
        assert recorder.shapes, f"{name} did not run"
        assert set(recorder.shapes) <= warmed[name], f"{name} met shapes the warm-up did not run"
    for padded_faces, plain_faces in zip(found, expected):
        assert len(padded_faces) == len(plain_faces)
        for padded, plain in zip(padded_faces, plain_faces):
            np.testing.assert_allclose(padded.box, plain.box, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default padding is for CUDA tensors; no GPU here")
def test_cuda_batches_are_padded_by_default():
    recorder = _Recorder(torch.nn.Identity())
    out = forward_in_bucket(recorder, torch.zeros((3, 2), device="cuda"))
    assert recorder.shapes == [(4, 2)] and out.shape == (3, 2)


def test_padded_pnet_passes_stay_within_the_memory_bound():
    """Photos per pass on the device: with padding a power of two, so a padded last pass holds no more pixels than
    the unpadded bounds allow (decoded pixels, P-Net's working pixels)."""
    detector = FaceDetector(max_side=640, images_on_device=True)
    sizes = ((3024, 4032), (1536, 2048), (1080, 1920))  # 12 MP phone photo, 3 MP, 1080p
    assert [detector._images_per_pass(*size) for size in sizes] == [11, 42, 64]
    detector.pad_batches = True
    assert [detector._images_per_pass(*size) for size in sizes] == [8, 32, 64]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; none here")
@pytest.mark.parametrize("count", [1, 3, 8, 13])
def test_cuda_graph_replays_give_the_eager_outputs_and_outputs_outlive_the_next_replay(count):
    detector = FaceDetector(device="cuda", max_side=640)
    mesh = FaceMesh(device="cuda")
    rng = np.random.default_rng(count)
    cases = ((detector._onet, detector.onet, (count, 3, 48, 48)), (mesh.runner, mesh.net, (count, 3, 192, 192)))
    for runner, net, shape in cases:
        assert runner.cuda_graphs
        batch = torch.from_numpy(rng.uniform(-1, 1, shape).astype(np.float32)).cuda()
        with torch.inference_mode():
            graphed, eager = runner(batch), forward_in_bucket(net, batch, pad=True)
            runner(torch.zeros_like(batch))  # a later replay must not change the outputs already returned
        assert (bucket_size(count), *shape[1:]) in [key[:1] + key[1] for key in runner.graphs]
        for got, want in zip(graphed, eager):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; none here")
def test_cuda_graphs_of_the_compiled_nets_give_the_eager_outputs(capsys):
    """compile_nets on a GPU: BlazeFace's and the mesh's graphs capture torch.compile's kernels, with the eager
    nets' outputs within float rounding, and no fallback to the eager net was needed."""
    from facefuse.blazeface import BlazeFace

    blazeface = BlazeFace("cuda", runtime="torch", pad_batches=True, cuda_graphs=True, compile_net=True)
    mesh = FaceMesh(device="cuda", compile_net=True)
    rng = np.random.default_rng(0)
    for runner, net in ((blazeface.runner, blazeface.net), (mesh.runner, mesh.net)):
        for count in (1, 3, 16):
            batch = torch.from_numpy(rng.uniform(-1, 1, (count, 3, 192, 192)).astype(np.float32)).cuda()
            with torch.inference_mode():
                for got, want in zip(runner(batch), forward_in_bucket(net, batch, pad=True), strict=True):
                    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
        assert runner.graph_net is not net
    assert "torch.compile" not in capsys.readouterr().err


def test_bucketed_net_off_cuda_is_the_padded_forward():
    """On the CPU (tests here) nothing is captured: the padded eager pass, as forward_in_bucket."""
    recorder = _Recorder(torch.nn.Identity())
    runner = BucketedNet(recorder, pad=True, cuda_graphs=True)
    out = runner(torch.arange(6.0).reshape(3, 2))
    assert recorder.shapes == [(4, 2)] and out.shape == (3, 2) and not runner.graphs
    assert BucketedNet(recorder, pad=False)(torch.zeros((3, 2))).shape == (3, 2)
    assert recorder.shapes[-1] == (3, 2)


def test_bucketed_net_compile_failure_falls_back_to_the_eager_net(capsys):
    """Where torch.compile's net fails at its first pass (no compiler, an untraceable operator) the graphs take the
    eager net and stderr says so once; an eager net's own failure is not hidden."""
    eager = _Recorder(torch.nn.Identity())
    runner = BucketedNet(eager, pad=True, cuda_graphs=True, name="test net")

    def failing(batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no working C compiler\nmore detail")

    runner.graph_net = failing  # what torch.compile returns, failing as it would on its first call
    out = runner.warm(torch.ones((2, 3)))
    assert torch.equal(out, torch.ones((2, 3))) and runner.graph_net is eager and eager.shapes == [(2, 3)]
    message = capsys.readouterr().err
    assert "torch.compile of the test net failed in its first pass (RuntimeError: no working C compiler)" in message
    assert "more detail" not in message
    runner.warm(torch.ones((2, 3)))
    assert capsys.readouterr().err == ""  # once
    broken = BucketedNet(failing, pad=True, cuda_graphs=True)
    with pytest.raises(RuntimeError, match="no working C compiler"):
        broken.warm(torch.ones((1, 3)))


def test_bucketed_net_capture_failure_of_the_compiled_net_captures_the_eager_net(capsys):
    """A compiled net that a CUDA graph capture refuses: that bucket (and every later one) captures the eager net
    instead, saying so once; a failing capture of the eager net itself is not hidden. (``capture`` is CUDA-only:
    here it is replaced by a function that fails for the compiled net, the failure being injected.)"""
    eager = torch.nn.Identity()
    runner = BucketedNet(eager, pad=True, cuda_graphs=True, compile_net=True, name="test net")
    compiled = runner.graph_net
    captured = []

    def capture(static_input: torch.Tensor) -> tuple[str, torch.Tensor]:
        captured.append(runner.graph_net)
        if runner.graph_net is not eager:
            raise RuntimeError("operation not permitted when stream is capturing")
        return "graph", runner.graph_net(static_input)

    runner.capture = capture
    graph, outputs = runner.capture_or_eager(torch.ones((2, 3)))
    assert graph == "graph" and torch.equal(outputs, torch.ones((2, 3)))
    assert captured == [compiled, eager] and runner.graph_net is eager
    assert "torch.compile of the test net failed in its capture (RuntimeError: operation not permitted" in \
        capsys.readouterr().err
    broken = BucketedNet(eager, pad=True, cuda_graphs=True)

    def failing_capture(static_input: torch.Tensor) -> None:
        raise RuntimeError("capture failed")

    broken.capture = failing_capture
    with pytest.raises(RuntimeError, match="capture failed"):
        broken.capture_or_eager(torch.ones((1, 3)))


def test_bucketed_net_compiles_only_for_cuda_graphs():
    """compile_net takes effect where graphs are captured (padded CUDA batches): elsewhere the net runs as given."""
    net = torch.nn.Identity()
    assert BucketedNet(net, pad=False, cuda_graphs=True, compile_net=True).graph_net is net
    assert BucketedNet(net, pad=True, cuda_graphs=False, compile_net=True).graph_net is net
    assert BucketedNet(net, pad=True, cuda_graphs=True).graph_net is net
    assert BucketedNet(net, pad=True, cuda_graphs=True, compile_net=True).graph_net is not net


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler; this host has none")
def test_compiled_nets_match_the_eager_ones_and_compile_twice_for_all_buckets():
    """compile_nets relies on torch.compile tracing BlazeFace's graph and the face mesh whole, and on its automatic
    dynamic shapes: the first bucket compiles, the second recompiles with the batch symbolic, later buckets reuse
    that. Checked here on the CPU (Inductor's C++ kernels; on the GPU its Triton kernels run the same traced graph;
    ~1 min of compiling on 2 cores): outputs as the eager nets' within float rounding, two graphs per net."""
    from torch._dynamo.utils import counters

    from facefuse.blazeface import BlazeFace

    nets = {"BlazeFace": BlazeFace(device="cpu", runtime="torch").net, "mesh": face_mesh.FaceMesh(runtime="torch").net}
    rng = np.random.default_rng(0)
    for name, net in nets.items():
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(net.eval())
        for bucket in bucket_sizes(8):
            batch = torch.from_numpy(rng.uniform(-1, 1, (bucket, 3, 192, 192)).astype(np.float32))
            with torch.inference_mode():
                for got, want in zip(compiled(batch), net(batch), strict=True):
                    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4, msg=f"{name} at batch {bucket}")
        assert counters["stats"]["unique_graphs"] == 2, (name, dict(counters["stats"]))
    torch._dynamo.reset()


def test_served_warm_up_runs_the_buckets_its_batch_cap_allows_and_no_larger():
    """preprocess warms up with max_rows = its config's max_batch_size: BlazeFace and the mesh run at every bucket
    a batch of that many rows can bring (two photos and two crops a row) and none larger (each bucket's graph and
    activations keep GPU memory); a full batch of distinct photos then meets only warmed shapes."""
    from facefuse.pipeline import FusionRequest, PreparedFusion, Preprocessor
    from tests.conftest import encode

    detector = FaceDetector(max_side=320, images_on_device=True, proposals="blazeface")  # the service's "auto"
    mesh = FaceMesh(runtime="torch")
    detector.pad_batches = mesh.pad_batches = True
    blazeface = _Recorder(detector.blazeface.net)
    detector.blazeface.runner = BucketedNet(blazeface, pad=True)
    mesh.runner = BucketedNet(mesh_net := _Recorder(mesh.net), pad=True)
    preprocessor = Preprocessor(detector, mesh)
    assert preprocessor.warm_up(requests=8, max_rows=2) == 2  # the warm-up batch itself within the cap
    warmed = {name: {shape[0] for shape in recorder.shapes} for name, recorder in
              (("BlazeFace", blazeface), ("mesh", mesh_net))}
    assert warmed == {"BlazeFace": {1, 2, 4}, "mesh": {1, 2, 4}}
    blazeface.shapes.clear()
    mesh_net.shapes.clear()
    hanks = np.asarray(Image.open(sample_image_path("Tom_Hanks_54745.png")).convert("RGB"))
    group = np.asarray(Image.open(sample_image_path("t1.jpg")).convert("RGB"))
    photos = [encode(image, fmt) for image in (hanks, group, np.ascontiguousarray(hanks[:, ::-1]),
                                               np.ascontiguousarray(group[:, ::-1])) for fmt in ("PNG",)]
    rows = [FusionRequest(photos[0], photos[1], 100.0, 100.0, b"{}"),
            FusionRequest(photos[2], photos[3], 100.0, 100.0, b"{}")]
    assert all(isinstance(result, PreparedFusion) for result in preprocessor.prepare_batch(rows))
    assert [shape[0] for shape in blazeface.shapes] == [4] and [shape[0] for shape in mesh_net.shapes] == [4]

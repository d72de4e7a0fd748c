"""ONNX export of the fusion network: named dynamic-batch tensors, parity with PyTorch through ONNX Runtime,
and only operators TensorRT's ONNX parser supports."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from build.export_onnx import OPSET, PARITY_TOLERANCE, example_inputs, export, simplify
from build.trt_ops import unsupported_ops
from facefuse.network import INPUT_NAMES, OUTPUT_NAMES, FusionNetwork


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return simplify(export(folder / "raw.onnx"), folder / "model.onnx")


def test_graph_has_the_named_dynamic_batch_interface(onnx_path):
    model = onnx.load(str(onnx_path))
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) >= OPSET >= 17


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_onnx_runtime_matches_pytorch(onnx_path, batch):
    inputs = example_inputs(batch=batch, seed=batch)
    with torch.inference_mode():
        expected = FusionNetwork().eval()(*inputs)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUT_NAMES), {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs)})
    errors = [float(np.abs(e.numpy() - g).max()) for e, g in zip(expected, got)]
    print(f"batch {batch}: max abs error {max(errors):.2e}")
    assert max(errors) < PARITY_TOLERANCE


def test_every_op_is_supported_by_tensorrt(onnx_path):
    assert unsupported_ops(onnx.load(str(onnx_path))) == {}


def test_service_runtime_matches_and_does_not_spin(onnx_path):
    # The served CPU runtime: same outputs, and worker threads that sleep between runs (spinning ones starved the
    # other models' processes on 2 cores: p99 536 ms instead of 40 at concurrency 1).
    from facefuse.fusion_runtime import OnnxRuntimeCpu

    runtime = OnnxRuntimeCpu(onnx_path, threads=1)
    assert runtime.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    inputs = example_inputs(batch=2, seed=4)
    with torch.inference_mode():
        expected = FusionNetwork().eval()(*inputs)
    got = runtime.run({name: t.numpy() for name, t in zip(INPUT_NAMES, inputs)})
    assert max(float(np.abs(e.numpy() - got[name]).max()) for e, name in zip(expected, OUTPUT_NAMES)) < PARITY_TOLERANCE


def test_warm_up_runs_one_batch_without_cuda_graphs():
    from facefuse.fusion_runtime import TorchRuntime, warm_up

    assert warm_up(TorchRuntime("cpu"), batch=3) == [3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_warm_up_captures_every_cuda_graph_bucket_at_load():
    """With CUDA graphs each batch bucket's graph is captured at load, not on the first request of that size."""
    from facefuse.fusion_runtime import TorchRuntime, warm_up

    runtime = TorchRuntime("cuda")
    assert warm_up(runtime) == list(runtime.BUCKETS)
    assert sorted(runtime.graphs) == list(runtime.BUCKETS)


def test_run_on_device_takes_tensors_and_gives_the_host_runs_outputs():
    """The fusion model's GPU-memory path (tensors_on_gpu): tensor inputs (as preprocess hands them over) in, owned
    float32 tensors out, the same values as run() on host arrays; a run longer than max_batch is chunked."""
    from facefuse.fusion_runtime import OnnxRuntimeCpu, TorchRuntime

    runtime = TorchRuntime("cpu")
    assert not runtime.gpu_tensors  # on the CPU the fusion model keeps host arrays
    runtime.max_batch = 2
    inputs = example_inputs(batch=3, seed=8)
    host = runtime.run({name: tensor.numpy() for name, tensor in zip(INPUT_NAMES, inputs)})
    on_device = runtime.run_on_device({name: tensor for name, tensor in zip(INPUT_NAMES, inputs)})
    for name in OUTPUT_NAMES:
        assert isinstance(on_device[name], torch.Tensor) and on_device[name].dtype == torch.float32
        np.testing.assert_allclose(on_device[name].numpy(), host[name], atol=1e-5)
    with pytest.raises(NotImplementedError, match="host arrays only"):
        OnnxRuntimeCpu.run_on_device(OnnxRuntimeCpu.__new__(OnnxRuntimeCpu), {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-memory tensors need a CUDA device")
def test_cuda_graph_outputs_on_the_device_outlive_the_next_replay():
    from facefuse.fusion_runtime import TorchRuntime

    runtime = TorchRuntime("cuda")
    assert runtime.gpu_tensors
    first = runtime.run_on_device({name: t.cuda() for name, t in zip(INPUT_NAMES, example_inputs(batch=3, seed=1))})
    kept = {name: value.clone() for name, value in first.items()}
    runtime.run_on_device({name: t.cuda() for name, t in zip(INPUT_NAMES, example_inputs(batch=3, seed=2))})
    for name in OUTPUT_NAMES:
        assert first[name].is_cuda and first[name].dtype == torch.float32
        torch.testing.assert_close(first[name], kept[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the network is offered for CUDA only")
def test_compiled_network_gives_the_eager_networks_results():
    """The fusion model's torch_compile: the compiled FP16 network under CUDA graphs gives the eager FP16 network's
    outputs (Inductor computes element-wise chains in FP32, so not bit for bit), at two bucket sizes."""
    from facefuse.fusion_runtime import TorchRuntime

    eager, compiled = TorchRuntime("cuda"), TorchRuntime("cuda", compile_network=True)
    assert compiled.name.endswith("-compiled")
    for batch in (3, 8):
        inputs = {name: t.numpy() for name, t in zip(INPUT_NAMES, example_inputs(batch, seed=batch, smooth=True))}
        expected, got = eager.run(inputs), compiled.run(inputs)
        for name in OUTPUT_NAMES:
            error = np.abs(got[name] - expected[name])
            assert error.mean() < 0.01 and np.quantile(error, 0.999) < 0.1, (name, error.mean(), error.max())


def test_load_runtime_reports_its_choice_and_an_unapplied_torch_compile(onnx_path):
    """torch_compile only means something to torch-cuda: with another runtime the load says it was not applied."""
    from facefuse.fusion_runtime import load_runtime

    reports: list[str] = []
    runtime = load_runtime(onnx_path.parent, "onnxruntime-cpu", report=reports.append, torch_compile=True)
    assert runtime.name == "onnxruntime-cpu"
    assert reports == ["fusion runtime: onnxruntime-cpu",
                       "torch_compile not applied: it is for torch-cuda, the runtime is onnxruntime-cpu"]
    with pytest.raises(ValueError, match="unknown fusion runtime"):
        load_runtime(onnx_path.parent, "tensorflow")

"""Every config.pbtxt parses with Triton's own protobuf, the ensemble wires existing tensors, and the ensemble's
interface is wire interface v1 exactly (DESIGN.md section 3)."""

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from facefuse.network import INPUT_NAMES, INPUT_SHAPES, OUTPUT_NAMES, OUTPUT_SHAPES

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
CONFIG_FILES = sorted(REPOSITORY.glob("*/config.pbtxt")) + sorted(REPOSITORY.glob("*/configs/*.pbtxt"))


def load(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def tensors(entries) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in entries}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPOSITORY)))
def test_config_parses_and_names_its_folder(path):
    config = load(path)
    model_dir = path.parent if path.name == "config.pbtxt" else path.parent.parent
    assert config.name == model_dir.name
    assert config.max_batch_size > 0


def test_models_present():
    assert {p.parent.name for p in REPOSITORY.glob("*/config.pbtxt")} == {
        "preprocess", "fusion", "postprocess", "face_fusion"}


def test_wire_interface_v1():
    ensemble = load(REPOSITORY / "face_fusion" / "config.pbtxt")
    assert ensemble.platform == "ensemble"
    assert tensors(ensemble.input) == {
        "SOURCE_IMAGE": ("TYPE_STRING", [1]), "TARGET_IMAGE": ("TYPE_STRING", [1]),
        "FACE_DEGREE": ("TYPE_FP32", [1]), "PROFILE_DEGREE": ("TYPE_FP32", [1]), "OPTIONS": ("TYPE_STRING", [1])}
    assert tensors(ensemble.output) == {"FUSED_IMAGE": ("TYPE_STRING", [1]), "METADATA": ("TYPE_STRING", [1])}


def test_ensemble_steps_connect_real_tensors():
    ensemble = load(REPOSITORY / "face_fusion" / "config.pbtxt")
    available = {**tensors(ensemble.input)}
    for step in ensemble.ensemble_scheduling.step:
        model = load(REPOSITORY / step.model_name / "config.pbtxt")
        model_inputs, model_outputs = tensors(model.input), tensors(model.output)
        assert set(step.input_map) == set(model_inputs), step.model_name
        for model_name, ensemble_name in step.input_map.items():
            assert ensemble_name in available, f"{step.model_name}.{model_name} reads unknown {ensemble_name}"
            assert available[ensemble_name] == model_inputs[model_name], (step.model_name, model_name)
        for model_name, ensemble_name in step.output_map.items():
            available[ensemble_name] = model_outputs[model_name]
        assert model.max_batch_size >= ensemble.max_batch_size
    for name, spec in tensors(ensemble.output).items():
        assert available[name] == spec


@pytest.mark.parametrize("model", ["preprocess", "fusion", "postprocess"])
def test_dynamic_batching_on_every_batchable_model(model):
    assert load(REPOSITORY / model / "config.pbtxt").HasField("dynamic_batching")


def test_a_request_may_carry_as_many_rows_as_preprocess_and_postprocess_batch():
    """preprocess's and postprocess's batches are capped (8 rows: fewer tail bursts, bench/RESULTS.md session 20) in
    every config the server may read, and the ensemble accepts exactly that many rows a request: more would be
    refused by Triton at load, fewer would refuse requests the models could take."""
    ensemble = load(REPOSITORY / "face_fusion" / "config.pbtxt").max_batch_size
    for model in ("preprocess", "postprocess"):
        for path in [REPOSITORY / model / "config.pbtxt", *sorted((REPOSITORY / model / "configs").glob("*.pbtxt"))]:
            assert load(path).max_batch_size == ensemble, path
    assert ensemble == 8


def test_fusion_configs_share_tensors_and_match_the_network():
    local = load(REPOSITORY / "fusion" / "config.pbtxt")
    gpu = load(REPOSITORY / "fusion" / "configs" / "gpu.pbtxt")
    assert local.backend == "python" and gpu.platform == "tensorrt_plan"
    assert tensors(local.input) == tensors(gpu.input) and tensors(local.output) == tensors(gpu.output)
    assert list(tensors(local.input)) == list(INPUT_NAMES)
    assert list(tensors(local.output)) == list(OUTPUT_NAMES)
    assert {name: tuple(dims) for name, (_, dims) in tensors(local.input).items()} == INPUT_SHAPES
    assert {name: tuple(dims) for name, (_, dims) in tensors(local.output).items()} == OUTPUT_SHAPES
    assert gpu.max_batch_size == local.max_batch_size == 32
    assert gpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


BATCHING_CONFIGS = [REPOSITORY / "preprocess" / "config.pbtxt", REPOSITORY / "fusion" / "config.pbtxt",
                    REPOSITORY / "fusion" / "configs" / "gpu.pbtxt", REPOSITORY / "postprocess" / "config.pbtxt"]


@pytest.mark.parametrize("path", BATCHING_CONFIGS, ids=lambda p: str(p.relative_to(REPOSITORY)))
def test_overload_is_refused_not_queued_forever(path):
    """Every batching model bounds its queue and its queueing time, and refuses (REJECT) beyond them."""
    policy = load(path).dynamic_batching.default_queue_policy
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert 0 < policy.max_queue_size <= 1024
    assert 0 < policy.default_timeout_microseconds <= 120_000_000  # below the client's default 120 s timeout
    assert policy.allow_timeout_override


def test_preprocess_limits_are_parameters():
    parameters = {key: value.string_value for key, value in load(REPOSITORY / "preprocess" / "config.pbtxt")
                  .parameters.items()}
    for key in ("max_image_bytes", "max_image_pixels", "max_image_side", "min_image_side", "min_face_eye_distance"):
        assert float(parameters[key]) > 0, key


def test_target_rgb_may_travel_in_gpu_memory():
    """preprocess hands TARGET_RGB over in GPU memory when it works on the GPU (both of its configs), and postprocess
    accepts inputs wherever they are (else Triton would copy them to the host first)."""
    for path in (REPOSITORY / "preprocess" / "config.pbtxt", REPOSITORY / "preprocess" / "configs" / "gpu.pbtxt"):
        assert load(path).parameters["outputs_on_gpu"].string_value == "auto", path
    post = load(REPOSITORY / "postprocess" / "config.pbtxt")
    assert post.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"


def test_instance_device_resolves_auto_and_keeps_explicit_choices():
    import torch

    from facefuse.triton_glue import instance_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert instance_device("auto", {"model_instance_kind": "CPU"}) == expected
    assert instance_device("cpu", {"model_instance_kind": "GPU", "model_instance_device_id": "1"}) == "cpu"
    assert instance_device("cuda:3", {}) == "cuda:3"


@pytest.mark.parametrize("model", ["preprocess", "postprocess"])
def test_gpu_copies_of_python_models_differ_only_in_instances_threads_delay_and_consent(model):
    """configs/gpu.pbtxt replaces config.pbtxt whole under --model-config-name=gpu (docker compose): a full copy with
    its own instance count, threads per instance and batching delay (each measured on its kind of host: the H100 /
    H200, the 2-core CPU) and, for preprocess, consent required (tests/test_consent.py)."""
    local, gpu = load(REPOSITORY / model / "config.pbtxt"), load(REPOSITORY / model / "configs" / "gpu.pbtxt")
    assert sum(group.count for group in gpu.instance_group) > sum(group.count for group in local.instance_group)
    assert gpu.dynamic_batching.max_queue_delay_microseconds == 0  # measured: no delay on the GPU
    for config in (local, gpu):
        config.ClearField("instance_group")
        config.dynamic_batching.ClearField("max_queue_delay_microseconds")
        config.parameters.pop("consent", None)
        config.parameters.pop("cpu_threads", None)
    assert text_format.MessageToString(gpu) == text_format.MessageToString(local)


def test_two_valued_parameters_default_to_the_first_choice_and_refuse_others():
    from facefuse.triton_glue import choice_parameter

    assert choice_parameter({}, "cuda_graphs", ("yes", "no")) == "yes"
    assert choice_parameter({"cuda_graphs": "no"}, "cuda_graphs", ("yes", "no")) == "no"
    with pytest.raises(ValueError, match='torch_compile must be "no" or "yes", got \'on\''):
        choice_parameter({"torch_compile": "on"}, "torch_compile", ("no", "yes"))

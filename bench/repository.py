"""A copy of the model repository with other instance counts, batching delays and batch sizes, for measuring them
(`python -m bench.run --instances preprocess=4,postprocess=4 --queue-delay-us preprocess=4000 --max-batch
preprocess=16`).

Weights and ONNX/plan files are linked, not copied.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from facefuse.local_server import GPU_MODELS, MODEL_REPOSITORY, gpu_config_path


def parse_assignments(text: str) -> dict[str, int]:
    """"preprocess=4,postprocess=2" -> {"preprocess": 4, "postprocess": 2}; "" -> {}."""
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, number = item.partition("=")
        if not name or not number.isdigit():
            raise ValueError(f"expected model=number, got {item!r}")
        values[name] = int(number)
    return values


def config_settings(text: str) -> dict[str, Any]:
    """The settings a benchmark varies, read from a config's text: max_batch_size, the instance count (all groups;
    none for an ensemble), the batching delay in us (where there is dynamic batching) and `cpu_threads` (where set).
    Plain text, like the edits below: the device tool's GPU host has no tritonclient protobufs to parse configs
    with (tests/test_bench.py checks every shipped config against the protobuf reading)."""
    text = re.sub(r"#[^\n]*", "", text)  # comments out
    settings: dict[str, Any] = {"max_batch_size": _max_batch_size(text)}
    if not re.search(r'platform:\s*"ensemble"', text):
        group = re.search(r"instance_group\s*\[((?:[^\[\]]|\[[^\]]*\])*)\]", text)  # inner [ ] (gpus) allowed
        counts = [int(count) for count in re.findall(r"count:\s*(\d+)", group.group(1))] if group else []
        settings["instances"] = sum(counts) or 1
    if re.search(r"dynamic_batching\s*\{", text):
        delay = re.search(r"max_queue_delay_microseconds:\s*(\d+)", text)
        settings["queue_delay_us"] = int(delay.group(1)) if delay else 0
    threads = re.search(r'key:\s*"cpu_threads"\s*value:\s*\{\s*string_value:\s*"(\d+)"', text)
    if threads:
        settings["cpu_threads"] = int(threads.group(1))
    return settings


def _gpu_settings(repository: Path) -> dict[str, dict[str, Any]]:
    return {model: config_settings(gpu_config_path(model, repository).read_text()) for model in GPU_MODELS}


def gpu_config_counts(repository: Path = MODEL_REPOSITORY) -> dict[str, int]:
    """The instance count of every GPU model in its GPU config (configs/gpu.pbtxt, else config.pbtxt): what docker
    compose serves, measured on the H200 (deploy.multi_gpu reads the same)."""
    return {model: settings["instances"] for model, settings in _gpu_settings(repository).items()}


def gpu_config_cpu_threads(repository: Path = MODEL_REPOSITORY) -> dict[str, int]:
    """The `cpu_threads` parameter of every GPU model whose GPU config sets one: with gpu_config_counts, what
    `bench.run --instances gpu` serves (the copy starts from config.pbtxt, whose CPU-host threads differ)."""
    return {model: settings["cpu_threads"] for model, settings in _gpu_settings(repository).items()
            if "cpu_threads" in settings}


def gpu_config_queue_delays(repository: Path = MODEL_REPOSITORY) -> dict[str, int]:
    """The batching delay (max_queue_delay_microseconds) of every GPU model in its GPU config: with
    gpu_config_counts, what `bench.run --instances gpu` serves."""
    return {model: settings.get("queue_delay_us", 0) for model, settings in _gpu_settings(repository).items()}


def served_settings(instances: str, queue_delays_us: str, cpu_threads: str, on_gpu: bool,
                    repository: Path = MODEL_REPOSITORY) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """The instance counts, batching delays (us) and `cpu_threads` that `bench.run` serves, from its --instances,
    --queue-delay-us and --cpu-threads arguments: "gpu" counts are the GPU configs'. Where the models run on a GPU
    (``on_gpu``, or counts "gpu") the delays and threads start from the GPU configs' too, whatever counts are asked
    for: the local server reads each model's config.pbtxt, the CPU host's (2 / 1 / 2 ms of batching delay, one
    thread), and explicit counts alone served those on the H100s of sessions 18-21 instead of the GPU configs'
    none. Explicit delays and threads win."""
    gpu_settings = on_gpu or instances == "gpu"
    counts = gpu_config_counts(repository) if instances == "gpu" else parse_assignments(instances)
    delays = {**(gpu_config_queue_delays(repository) if gpu_settings else {}), **parse_assignments(queue_delays_us)}
    threads = {**(gpu_config_cpu_threads(repository) if gpu_settings else {}), **parse_assignments(cpu_threads)}
    return counts, delays, threads


def served_configs(repository: Path = MODEL_REPOSITORY) -> dict[str, dict[str, Any]]:
    """What the local server reads (each model's config.pbtxt; it passes no --model-config-name): per model its
    ``config_settings``, for a benchmark's summary. Recorded as served, not as asked for: an empty "as configured"
    hid the CPU host's delays in sessions 18-21's GPU runs."""
    return {path.parent.name: config_settings(path.read_text()) for path in sorted(repository.glob("*/config.pbtxt"))}


def parse_parameters(items: list[str]) -> dict[str, dict[str, str]]:
    """["preprocess.detector_max_side=1280"] -> {"preprocess": {"detector_max_side": "1280"}}."""
    values: dict[str, dict[str, str]] = {}
    for item in items:
        target, _, value = item.partition("=")
        model, _, key = target.partition(".")
        if not model or not key or not _:
            raise ValueError(f"expected model.parameter=value, got {item!r}")
        values.setdefault(model, {})[key] = value
    return values


def tuned_repository(destination: Path, instances: dict[str, int], queue_delays_us: dict[str, int],
                     source: Path = MODEL_REPOSITORY, cpu_threads: dict[str, int] | None = None,
                     parameters: dict[str, dict[str, str]] | None = None,
                     max_batch_sizes: dict[str, int] | None = None) -> Path:
    """Copy ``source`` to ``destination`` with each named model's instance count / max queue delay / `cpu_threads`
    parameter / existing string parameters / max_batch_size replaced. A max_batch_size may be lowered or raised (a
    TensorRT plan's only lowered: its engine's profile ends at the configured size); preferred batch sizes above it
    are dropped, and every ensemble's becomes the smallest of the models it runs (Triton refuses an ensemble that
    allows larger batches than one of them)."""
    cpu_threads, parameters, max_batch_sizes = cpu_threads or {}, parameters or {}, max_batch_sizes or {}
    named = set(instances) | set(queue_delays_us) | set(cpu_threads) | set(parameters) | set(max_batch_sizes)
    unknown = named - {path.name for path in source.iterdir() if path.is_dir()}
    if unknown:
        raise ValueError(f"no such model(s) in {source}: {', '.join(sorted(unknown))}")
    if destination.exists():
        shutil.rmtree(destination)
    for path in sorted(source.rglob("*")):
        target = destination / path.relative_to(source)
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".onnx", ".plan"):
            target.symlink_to(path.resolve())
        else:
            shutil.copy2(path, target)
    ensembles = {}
    if max_batch_sizes:
        if min(max_batch_sizes.values()) < 1:
            raise ValueError(f"max_batch_size must be >= 1: {max_batch_sizes}")
        ensembles = {path.parent.name: _ensemble_steps(path.read_text())
                     for path in destination.glob("*/config.pbtxt") if 'platform: "ensemble"' in path.read_text()}
        named |= set(ensembles)
    for name in named:
        if name in ensembles:
            continue  # after the models it runs
        for config_path in _config_paths(destination, name):
            text = config_path.read_text()
            if name in max_batch_sizes:
                text = _set_max_batch_size(text, max_batch_sizes[name], name)
            if name in cpu_threads and 'backend: "python"' in text:  # a TensorRT plan's config has no threads
                text = _set_cpu_threads(text, cpu_threads[name], name)
            if name in instances:
                if instances[name] < 1:
                    raise ValueError(f"{name}: instance count must be >= 1")
                text = _replace_one(text, r"(instance_group\s*\[\s*\{\s*count:\s*)\d+", instances[name], name)
            if name in queue_delays_us:
                text = _replace_one(text, r"(max_queue_delay_microseconds:\s*)\d+", queue_delays_us[name], name)
            for key, value in parameters.get(name, {}).items():
                text = set_string_parameter(text, key, value, name)
            config_path.write_text(text)
    for name, steps in ensembles.items():
        # The smallest max batch among the models it runs, in any config the server may read for them.
        size = min(_max_batch_size(path.read_text()) for step in steps for path in _config_paths(destination, step))
        size = min(size, max_batch_sizes.get(name, size))  # or less, if asked
        for config_path in _config_paths(destination, name):
            config_path.write_text(_set_max_batch_size(config_path.read_text(), size, name))
    return destination


def _config_paths(repository: Path, model: str) -> list[Path]:
    """config.pbtxt and the per-deployment copies (configs/gpu.pbtxt): whichever the server reads."""
    return [repository / model / "config.pbtxt", *sorted((repository / model).glob("configs/*.pbtxt"))]


def _ensemble_steps(text: str) -> list[str]:
    return re.findall(r'model_name:\s*"([^"]+)"', text)


def _max_batch_size(text: str) -> int:
    return int(re.search(r"max_batch_size:\s*(\d+)", text).group(1))


def set_string_parameter(text: str, key: str, value: str, model: str) -> str:
    """Config text with the existing string parameter ``key`` set to ``value`` (ValueError when it is not there
    exactly once)."""
    return _replace_one(text, rf'(key:\s*"{re.escape(key)}"\s*value:\s*{{\s*string_value:\s*")[^"]*(?=")',
                        value, model)


def _replace_one(text: str, pattern: str, value: int | str, model: str) -> str:
    # Plain text edits (the GPU host has no tritonclient protobufs); our configs name each setting exactly once.
    edited, count = re.subn(pattern, lambda match: f"{match.group(1)}{value}", text)
    if count != 1:
        raise ValueError(f"{model}/config.pbtxt: expected one match of {pattern!r}, found {count}")
    return edited


def _set_max_batch_size(text: str, size: int, model: str) -> str:
    if 'platform: "tensorrt_plan"' in text and size > _max_batch_size(text):
        raise ValueError(f"{model}: a TensorRT plan's max_batch_size cannot be raised above {_max_batch_size(text)} "
                         "(its engine's batch profile ends there)")
    text = _replace_one(text, r"(max_batch_size:\s*)\d+", size, model)

    def kept(match: re.Match) -> str:
        sizes = [value.strip() for value in match.group(2).split(",") if int(value) <= size]
        return f"{match.group(1)}{', '.join(sizes) or str(size)} ]"

    return re.sub(r"(preferred_batch_size:\s*\[\s*)([^\]]*)\]", kept, text)


def _set_cpu_threads(text: str, threads: int, model: str) -> str:
    entry = f'{{ key: "cpu_threads" value: {{ string_value: "{threads}" }} }}'
    if '"cpu_threads"' in text:
        edited, count = re.subn(r'\{ key: "cpu_threads" value: \{ string_value: "\d+" \} \}', lambda _: entry, text)
    else:
        edited, count = re.subn(r"parameters\s*\[", lambda _: f"parameters [\n  {entry},", text)
    if count != 1:
        raise ValueError(f"{model}/config.pbtxt: cannot set cpu_threads (no single parameters block)")
    return edited

"""A copy of the model repository with other instance counts and batching delays, for measuring them
(`python -m bench.run --instances preprocess=4,postprocess=4 --queue-delay-us preprocess=4000`).

Configs are edited as protobuf (not text substitution); weights and ONNX/plan files are linked, not copied.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from facefuse.local_server import MODEL_REPOSITORY


def parse_assignments(text: str) -> dict[str, int]:
    """"preprocess=4,postprocess=2" -> {"preprocess": 4, "postprocess": 2}; "" -> {}."""
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, number = item.partition("=")
        if not name or not number.isdigit():
            raise ValueError(f"expected model=number, got {item!r}")
        values[name] = int(number)
    return values


def tuned_repository(destination: Path, instances: dict[str, int], queue_delays_us: dict[str, int],
                     source: Path = MODEL_REPOSITORY) -> Path:
    """Copy ``source`` to ``destination`` with each named model's instance count / max queue delay replaced."""
    unknown = (set(instances) | set(queue_delays_us)) - {path.name for path in source.iterdir() if path.is_dir()}
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
    for name in set(instances) | set(queue_delays_us):
        config_path = destination / name / "config.pbtxt"
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        if name in instances:
            if instances[name] < 1:
                raise ValueError(f"{name}: instance count must be >= 1")
            for group in config.instance_group:
                group.count = instances[name]
        if name in queue_delays_us:
            config.dynamic_batching.max_queue_delay_microseconds = queue_delays_us[name]
        config_path.write_text(text_format.MessageToString(config))
    return destination

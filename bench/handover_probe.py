"""What the Python backend charges per tensor handed over: toy models that answer each request with K small outputs
(K = 1 and 11: preprocess handed over 11 per request until session 27, 5 since), alone and in a two-step ensemble
whose second model takes all K as inputs (preprocess -> fusion / postprocess), served by the real local Triton,
measured with perf_analyzer;
then the one-output model again with an input of ``--input-kb`` KB per request (preprocess takes two JPEGs: 0.72-0.75 MB
for the bench's 1080p pairs) against one byte.

    python -m bench.handover_probe [--outputs 1,11] [--device cpu|cuda] [--concurrency 16] [--measurement-ms 3000]
                                   [--input-kb 800]

Each model has one instance, batches of up to 8 requests and no batching delay, and does nothing but build its
tensors (on "cuda": torch tensors in GPU memory through DLPack, one wait for the GPU per batch, as preprocess does),
so the time per request is the handover's; like every model of ours it keeps freed memory (facefuse.hostmem), else
each large input page-faults through fresh memory (2-core CPU: 1.4 instead of 0.1 ms per 800 KB request). Prints
requests/s and p50 per model and K; the cost of one more tensor per request, (1/rate(K) - 1/rate(1)) / (K - 1), the
one instance's time per request and tensor; and what the input's bytes add to the server's split per request (queue,
compute input, infer, output), not to the rates: where perf_analyzer shares the server's cores, sending the large
input sets the pace.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np

from bench.inputs import write_tensor_data
from bench.run import REPO_ROOT, run_perf
from facefuse.local_server import free_ports, start, stop_process

MAX_BATCH = 8
OUTPUT_SHAPE = (4,)  # small: the probe is about the count of tensors, not their bytes

# The toy models' code, written into the probe's repository. pb_utils exists only inside the stub, which ignores
# PYTHONPATH: its entries go onto sys.path first, as in the real models.
STUB_PATH = '''import os
import sys

for _path in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    if _path and _path not in sys.path:
        sys.path.insert(0, _path)
'''

PRODUCER = STUB_PATH + '''import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from facefuse.hostmem import keep_freed_memory

        keep_freed_memory()  # as every model of ours: large inputs reuse heap memory, not fresh pages per request
        config = json.loads(args["model_config"])
        self.names = [output["name"] for output in config["output"]]
        self.device = config["parameters"]["device"]["string_value"]
        if self.device == "cuda":
            import torch
            import torch.utils.dlpack

            self.torch = torch
            self.dlpack = torch.utils.dlpack

    def execute(self, requests):
        outputs = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "X").as_numpy().shape[0]  # as preprocess reads its JPEGs
            if self.device == "cuda":
                outputs.append([self.torch.full((rows, {width}), float(index), device="cuda")
                                for index in range(len(self.names))])
            else:
                outputs.append([np.full((rows, {width}), float(index), dtype=np.float32)
                                for index in range(len(self.names))])
        if self.device == "cuda":
            self.torch.cuda.current_stream().synchronize()  # one wait per batch, as preprocess's outputs
            return [pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack(name, self.dlpack.to_dlpack(value))
                                                for name, value in zip(self.names, values)]) for values in outputs]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in zip(self.names, values)])
                for values in outputs]
'''

CONSUMER = STUB_PATH + '''import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from facefuse.hostmem import keep_freed_memory

        keep_freed_memory()

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = request.inputs()  # every tensor handed over; Y carries their count back
            rows = inputs[0].shape()[0]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", np.full((rows, 1), len(inputs),
                                                                                      dtype=np.float32))]))
        return responses
'''


def _tensors(widths: dict[str, int]) -> str:
    """Config entries for tensors by name -> width: FP32 rows of that many values; X, the request's payload, BYTES."""
    return ",\n".join(f'  {{ name: "{n}" data_type: {"TYPE_STRING" if n == "X" else "TYPE_FP32"} dims: [ {width} ] }}'
                      for n, width in widths.items())


def _python_config(name: str, inputs: dict[str, int], outputs: dict[str, int], parameters: dict[str, str],
                   gpu_inputs: bool = False) -> str:
    """A Python model's config: ``inputs`` and ``outputs`` name -> width (see _tensors)."""
    settings = {**parameters, **({"FORCE_CPU_ONLY_INPUT_TENSORS": "no"} if gpu_inputs else {})}
    parameter_text = ",\n".join(f'  {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
                                for key, value in settings.items())
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {MAX_BATCH}\n'
            f"dynamic_batching {{ max_queue_delay_microseconds: 0 }}\n"
            f"input [\n{_tensors(inputs)}\n]\noutput [\n{_tensors(outputs)}\n]\n"
            f"instance_group [ {{ count: 1 kind: KIND_CPU }} ]\n"
            + (f"parameters [\n{parameter_text}\n]\n" if parameter_text else ""))


def _ensemble_config(name: str, producer: str, consumer: str, names: list[str]) -> str:
    mapped = "\n".join(f'      output_map {{ key: "{n}" value: "{n.lower()}" }}' for n in names)
    taken = "\n".join(f'      input_map {{ key: "{n}" value: "{n.lower()}" }}' for n in names)
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {MAX_BATCH}\n'
            f'input [\n{_tensors({"X": 1})}\n]\noutput [\n{_tensors({"Y": 1})}\n]\n'
            "ensemble_scheduling {\n  step [\n"
            f'    {{\n      model_name: "{producer}"\n      model_version: -1\n'
            f'      input_map {{ key: "X" value: "X" }}\n{mapped}\n    }},\n'
            f'    {{\n      model_name: "{consumer}"\n      model_version: -1\n{taken}\n'
            '      output_map { key: "Y" value: "Y" }\n    }\n  ]\n}\n')


def probe_repository(folder: Path, output_counts: list[int], device: str) -> dict[int, tuple[str, str]]:
    """Write the probe's models under ``folder``: per K a producer of K outputs, a consumer of K inputs and their
    ensemble; returns K -> (producer, ensemble) names."""
    models: dict[int, tuple[str, str]] = {}
    for count in output_counts:
        names = [f"OUT_{index}" for index in range(count)]
        handed_over = dict.fromkeys(names, OUTPUT_SHAPE[0])
        producer, consumer, chain = f"producer_k{count}", f"consumer_k{count}", f"chain_k{count}"
        files = {
            producer: (_python_config(producer, {"X": 1}, handed_over, {"device": device}),
                       PRODUCER.replace("{width}", str(OUTPUT_SHAPE[0]))),
            consumer: (_python_config(consumer, handed_over, {"Y": 1}, {}, gpu_inputs=device == "cuda"), CONSUMER),
            chain: (_ensemble_config(chain, producer, consumer, names), None),
        }
        for model, (config, code) in files.items():
            (folder / model / "1").mkdir(parents=True, exist_ok=True)
            (folder / model / "config.pbtxt").write_text(config)
            if code is not None:
                (folder / model / "1" / "model.py").write_text(code)
        models[count] = (producer, chain)
    return models


def payload(size: int) -> np.ndarray:
    """The request's X: ``size`` bytes as a one-row BYTES tensor (what write_tensor_data serialises)."""
    return np.array([[bytes(size)]], dtype=object)


SERVER_PARTS = {"queue": "Server Queue", "input": "Server Compute Input", "infer": "Server Compute Infer",
                "output": "Server Compute Output"}


def server_times(perf_csv: Path) -> dict[str, float]:
    """perf_analyzer's server-side split of a request in ms (--verbose-csv): Triton's compute input / output and the
    stub's batch (compute infer: a request's figure is its whole batch's time), apart from what the client costs."""
    with open(perf_csv) as handle:
        row = next(csv.DictReader(handle))
    return {label: int(row[column]) / 1000.0 for label, column in SERVER_PARTS.items() if column in row}


def _split(times: dict[str, float]) -> str:
    return ", ".join(f"{label} {value:.2f}" for label, value in times.items())


def per_tensor_ms(rates: dict[int, float]) -> float | None:
    """One more tensor per request, in ms of the instance's time per request: from the lowest and highest K."""
    low, high = min(rates), max(rates)
    if high == low or not rates[low] or not rates[high]:
        return None
    return (1000.0 / rates[high] - 1000.0 / rates[low]) / (high - low)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", default="1,11", help="outputs per request, comma-separated (at least two)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--measurement-ms", type=int, default=3000)
    parser.add_argument("--input-kb", type=int, default=800, help="the larger input's size in KB (0: skip it)")
    parser.add_argument("--folder", type=Path, default=REPO_ROOT / ".cache" / "handover_probe")
    args = parser.parse_args(argv)
    counts = sorted({int(value) for value in args.outputs.split(",")})
    if len(counts) < 2 or counts[0] < 1:
        parser.error("--outputs needs at least two counts of 1 or more")
    repository = args.folder / "repository"
    if repository.exists():
        shutil.rmtree(repository)
    models = probe_repository(repository, counts, args.device)
    input_data = write_tensor_data(args.folder / "input.json", {"X": payload(1)})
    ports = free_ports()

    def measure(model: str, data: Path, label: str) -> tuple[dict[str, float], dict[str, float]]:
        """One perf_analyzer level: its figures and the server's split, each read once."""
        perf_csv = args.folder / f"{label}.csv"
        figures, _ = run_perf(model, data, args.concurrency, ports, args.measurement_ms, perf_csv,
                              warmup_requests=200)
        return figures, server_times(perf_csv)

    server = start(ports, log_path=args.folder / "triton.log", model_repository=repository, quiet=True)
    rates: dict[str, dict[int, float]] = {"producer": {}, "chain": {}}
    splits: dict[str, dict[str, float]] = {}
    try:
        for count, (producer, chain) in models.items():
            for kind, model in (("producer", producer), ("chain", chain)):
                figures, splits[model] = measure(model, input_data, model)
                rates[kind][count] = figures["throughput_per_s"]
                print(f"[handover] {model}: {count} tensor(s) per request, {figures['throughput_per_s']:.1f} "
                      f"requests/s, p50 {figures['p50_ms']:.2f} ms (c={args.concurrency}, {args.device}); server ms "
                      f"per request: {_split(splits[model])}", flush=True)
        # The per-tensor cost before the large input's run: a caller's time limit may end the probe there.
        for kind, label in (("producer", "out of one model"), ("chain", "from one model into the next")):
            cost = per_tensor_ms(rates[kind])
            spent = "n/a" if cost is None else f"{cost * 1000:.0f} us"
            print(f"[handover] one more tensor per request {label}: {spent} of the instance's time per request",
                  flush=True)
        if args.input_kb:
            producer = models[counts[0]][0]
            large_input = write_tensor_data(args.folder / "input_large.json", {"X": payload(args.input_kb * 1024)})
            large, large_split = measure(producer, large_input, f"{producer}_input")
            print(f"[handover] {producer} with {args.input_kb} KB in per request: {large['throughput_per_s']:.1f} "
                  f"requests/s, p50 {large['p50_ms']:.2f} ms; server ms per request: {_split(large_split)}", flush=True)
    finally:
        stop_process(server)
    if args.input_kb:
        # From the server's split, not the rates: with a large payload the client on the same cores may set the pace.
        small = splits[models[counts[0]][0]]
        added = {label: large_split[label] - small[label] for label in ("input", "infer") if label in small}
        print(f"[handover] an input of {args.input_kb} KB per request instead of 1 byte: "
              + ", ".join(f"{label} {value:+.2f} ms" for label, value in added.items())
              + " per request (infer: the stub's whole batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

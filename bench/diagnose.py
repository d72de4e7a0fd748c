"""Per-stage timings of single fusions, in process and through the local Triton server (for profiling a host).

    python -m bench.diagnose [--device cuda] [--repeats 5] [--model-repository DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.inputs import benchmark_pair
from facefuse.local_server import MODEL_REPOSITORY, REPO_ROOT, free_ports, start, stop_process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args(argv)
    from facefuse.engine import LocalFusion

    source, target = benchmark_pair()
    engine = LocalFusion(runtime=args.runtime, device=args.device)
    print(f"[diagnose] in process, runtime {engine.runtime.name}, detector on {args.device}")
    for _ in range(args.repeats):
        started = time.perf_counter()
        _, metadata = engine.fuse(source, target, 100, 100, {"target_face": 0})
        print(f"  total {(time.perf_counter() - started) * 1000:7.1f} ms  {json.dumps(metadata['timings_ms'])}")
    if args.skip_server:
        return 0
    from client.api import FusionClient

    ports = free_ports()
    server = start(ports, REPO_ROOT / "out" / "diagnose-triton.log", model_repository=args.model_repository)
    try:
        with FusionClient(f"localhost:{ports.grpc}", "grpc") as client:
            print("[diagnose] through Triton (gRPC)")
            for _ in range(args.repeats):
                started = time.perf_counter()
                result = client.fuse(source, target, 100, 100, {"target_face": 0})
                print(f"  total {(time.perf_counter() - started) * 1000:7.1f} ms  "
                      f"{json.dumps(result.metadata['timings_ms'])}")
    finally:
        stop_process(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())

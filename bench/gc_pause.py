"""Python's full garbage collection in a model process: how many objects it walks and how long it pauses, before
and after ``hostmem.freeze_heap`` (what each model's initialize now calls last).

    python -m bench.gc_pause [--device cpu|cuda] [--repeats 5]

Builds what the preprocess and postprocess models hold (the MTCNN/BlazeFace detector, the face mesh, the postprocess
module's tables) in this process, as their stubs do, then times ``gc.collect()`` (median of ``--repeats``). A full
collection runs when enough allocations survived the younger generations, i.e. inside some request's execute: its
pause is part of that request's latency (the execute log's ``gc`` stage records them as served).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from facefuse import postprocess_torch  # noqa: F401 - its module-level tables and imports, as the stub has them
from facefuse.detection import FaceDetector
from facefuse.face_mesh import FaceMesh
from facefuse.hostmem import freeze_heap


def full_collection_ms(repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        timings.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    models = (FaceDetector(device=args.device), FaceMesh(device=args.device))  # noqa: F841 - alive while timed
    tracked = len(gc.get_objects())
    before = full_collection_ms(args.repeats)
    frozen = freeze_heap()
    after = full_collection_ms(args.repeats)
    print(f"[gc] {tracked} tracked objects on {args.device}: full collection {before:.2f} ms; after freeze_heap "
          f"({frozen} frozen) {after:.4f} ms (median of {args.repeats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

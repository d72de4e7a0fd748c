"""Export the fusion network to ONNX (named tensors, dynamic batch), simplify it, and check it.

Usage: python -m build.export_onnx --out model_repository/fusion/1/model.onnx
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from facefuse.network import INPUT_NAMES, OUTPUT_NAMES, FusionNetwork, example_inputs

OPSET = 17
# A quarter of one 8-bit grey level: float32 rounding in the spline sums differs between runtimes.
PARITY_TOLERANCE = 1e-3


def export(out_path: Path, opset: int = OPSET) -> Path:
    """Trace FusionNetwork to ONNX at `out_path` with a dynamic batch axis on every tensor."""
    network = FusionNetwork().eval()
    dynamic_axes = {name: {0: "batch"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        torch.onnx.export(
            network, example_inputs(), str(out_path), input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic_axes, opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )
    return out_path


def simplify(in_path: Path, out_path: Path) -> Path:
    """Run onnxsim (constant folding, dead-node removal) and check the result."""
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(str(in_path)))
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model")
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return out_path


def parity(onnx_path: Path, batch: int = 4, seed: int = 1) -> float:
    """Max abs difference between PyTorch and ONNX Runtime (CPU) over both outputs."""
    import onnxruntime

    inputs = example_inputs(batch, seed)
    with torch.inference_mode():
        expected = [tensor.numpy() for tensor in FusionNetwork().eval()(*inputs)]
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {name: tensor.numpy() for name, tensor in zip(INPUT_NAMES, inputs)}
    got = session.run(list(OUTPUT_NAMES), feeds)
    return float(max(np.abs(a - b).max() for a, b in zip(expected, got)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("model_repository/fusion/1/model.onnx"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    raw_path = args.out.with_suffix(".raw.onnx")
    print(f"[export] tracing FusionNetwork to {raw_path} (opset {OPSET}, dynamic batch)", flush=True)
    export(raw_path)
    print(f"[export] simplifying with onnxsim -> {args.out}", flush=True)
    simplify(raw_path, args.out)
    raw_path.unlink()
    error = parity(args.out)
    ops = sorted({node.op_type for node in onnx.load(str(args.out)).graph.node})
    print(f"[export] ONNX Runtime vs PyTorch max abs error {error:.2e}; ops: {', '.join(ops)}", flush=True)
    if error > PARITY_TOLERANCE:
        print(f"[export] parity error {error:.2e} exceeds {PARITY_TOLERANCE:.0e}", file=sys.stderr)
        return 1
    print(f"[export] done in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

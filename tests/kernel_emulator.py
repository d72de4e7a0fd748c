"""The fused CUDA kernels' C++ source (facefuse.fused_kernels) compiled by the host's C++ compiler and run on CPU
tensors, so that the fused branches of postprocess_torch run, and are compared, on a machine without a GPU.

What differs from the GPU: the launch (a loop here, jiterator's grid there) and the compiler (g++ with
-ffp-contract=off here, NVRTC there; the kernels round each float operation explicitly with __fmul_rn/__fadd_rn, so
contraction cannot change their results on either). Inputs are broadcast and loaded as float32, as jiterator
does for the kernels' common dtype float32.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from facefuse.fused_kernels import Kernel

_PRELUDE = """
#include <cmath>
// CUDA's explicitly rounded operations: on the host each float operation rounds on its own anyway (no contraction).
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
"""


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


_BUILD = Path(tempfile.mkdtemp(prefix="facefuse-kernels-"))
atexit.register(shutil.rmtree, _BUILD, ignore_errors=True)  # the compiled kernels live as long as the test run


@functools.lru_cache(maxsize=64)
def _library(kernel: Kernel) -> ctypes.CDLL:
    arguments = [f"inputs[{index}][i]" for index in range(len(kernel.params))]
    if kernel.outputs:
        arguments += [f"outputs[{index}][i]" for index in range(len(kernel.outputs))]
        call = f"{kernel.name}<float>({', '.join(arguments)});"
    else:
        call = f"outputs[0][i] = {kernel.name}<float>({', '.join(arguments)});"
    source = (f"{_PRELUDE}\n{kernel.source}\n"
              f'extern "C" void run(const float* const* inputs, float* const* outputs, long count) {{\n'
              f"  for (long i = 0; i < count; ++i) {call}\n}}\n")
    stem = hashlib.sha1(source.encode()).hexdigest()[:16]
    path = _BUILD / f"{stem}.cpp"
    path.write_text(source)
    library = _BUILD / f"{stem}.so"
    subprocess.run([compiler(), "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", str(path), "-o",
                    str(library)], check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(library))


def _pointers(arrays: list[np.ndarray]) -> ctypes.Array:
    return (ctypes.POINTER(ctypes.c_float) * len(arrays))(
        *(array.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) for array in arrays))


def launch(kernel: Kernel, inputs: Sequence[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """fused_kernels.jiterator_launch, on CPU tensors."""
    assert len(inputs) == len(kernel.params), (kernel.name, len(inputs))
    arrays = [np.ascontiguousarray(tensor.to(torch.float32).numpy()) for tensor in torch.broadcast_tensors(*inputs)]
    outs = [np.empty(arrays[0].shape, dtype=np.float32) for _ in range(max(1, len(kernel.outputs)))]
    _library(kernel).run(_pointers(arrays), _pointers(outs), ctypes.c_long(outs[0].size))
    results = tuple(torch.from_numpy(out) for out in outs)
    return results if kernel.outputs else results[0]

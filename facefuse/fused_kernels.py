"""Fused elementwise CUDA kernels for the watermark's full-resolution passes.

torch makes one memory pass per elementwise operation: the watermark's arithmetic (luma, the 5x5 fixed-point blur, the
texture measure, the re-marking check's Gaussian, the mark's interpolation, rounding and saturating add) took a few
dozen full-resolution passes per image, more than half of postprocess's GPU time at 8 rows
(bench/results/2026-12-06_H100_session14a_profile.txt). Each kernel here does one such step's whole arithmetic per
element. They are compiled at run time by ``torch.cuda.jiterator`` (NVRTC, which the CUDA build of torch ships: no
compiler on the host; compiled kernels are cached in ~/.cache/torch/kernels).

The results are bit-identical to the torch path they replace (postprocess_torch, which matches OpenCV):

* integer steps (luma, the fixed-point blur): every partial sum is an integer below 2**24, exact in float32 in any
  order;
* float steps (the Gaussian, the interpolation, the rounding): the torch path's operations in its order, each rounded
  on its own (``__fmul_rn``/``__fadd_rn``: no FMA contraction).

A kernel is plain C++ over ``T = float`` (every launch has a float input, so jiterator's common dtype is float32);
tests/kernel_emulator.py compiles the same source with the host's C++ compiler so that the fused branch runs, and is
compared, on a CPU-only machine too. ``FACEFUSE_FUSED_KERNELS=off`` keeps the torch path on a GPU host (for side by
side measurements); a GPU host where the kernels fail to compile says so once on stderr and keeps the torch path.
The mark's add has a faster form in ``facefuse.triton_kernels`` (used where Triton compiles; ``=jiterator`` keeps
the one here).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ENVIRONMENT_VARIABLE", "Kernel", "Launcher", "blur_u8_row_kernel", "column_detail_kernel",
           "float_pass_kernels", "launcher", "luma_kernel", "mark_kernel", "one", "self_check"]

ENVIRONMENT_VARIABLE = "FACEFUSE_FUSED_KERNELS"
# Jiterator's limit on a kernel's tensor arguments.
MAX_INPUTS = 8


def _unique(prefix: str, body: str) -> str:
    """A kernel name that differs whenever the code does (taps, weights): jiterator caches compiled kernels by name
    too, so two kernels of one name and different code must not meet."""
    return f"{prefix}_{hashlib.sha1(body.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class Kernel:
    """One elementwise function: ``body`` computes the result from the ``params`` (one element of each input) and
    returns it, or, with ``outputs``, assigns each of them (several results per element)."""

    name: str
    params: tuple[str, ...]
    body: str
    outputs: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        arguments = ", ".join([f"T {param}" for param in self.params] + [f"T& {output}" for output in self.outputs])
        return f"template <typename T> {'void' if self.outputs else 'T'} {self.name}({arguments}) {{ {self.body} }}"


def _float(value: float) -> str:
    """A float32 literal that parses back to exactly ``value`` (9 significant digits identify a float32)."""
    return f"{np.float32(value):.9e}f"


@functools.lru_cache(maxsize=8)
def luma_kernel(weights: tuple[int, int, int], shift: int) -> Kernel:
    """cv2.cvtColor(RGB2GRAY) in fixed point: (r*wr + g*wg + b*wb + half) >> shift, as float. ``one`` is a float
    0-dim tensor that makes the launch's dtype float32 (the channels are uint8)."""
    red, green, blue = (_float(weight) for weight in weights)
    body = (f"return floorf((red * {red} + green * {green} + blue * {blue} + {_float(1 << (shift - 1))})"
            f" * {_float(2.0 ** -shift)}) * one;")
    return Kernel(_unique("facefuse_luma", body), ("red", "green", "blue", "one"), body)


def _symmetric_sum(taps: Sequence[int], params: Sequence[str]) -> str:
    """sum(taps[i] * params[i]) as OpenCV pairs a symmetric kernel: centre, then mirrored pairs added first."""
    radius = len(taps) // 2
    terms = [f"{_float(taps[radius])} * {params[radius]}"]
    terms += [f"{_float(taps[offset])} * ({params[offset]} + {params[len(taps) - 1 - offset]})"
              for offset in range(radius)]
    return " + ".join(terms)


@functools.lru_cache(maxsize=8)
def blur_u8_row_kernel(taps: tuple[int, ...]) -> Kernel:
    """The horizontal pass of OpenCV's 8-bit Gaussian (integer taps; no rounding before the vertical pass)."""
    params = tuple(f"p{index}" for index in range(len(taps)))
    body = f"return {_symmetric_sum(taps, params)};"
    return Kernel(_unique("facefuse_blur_row", body), params, body)


@functools.lru_cache(maxsize=8)
def column_detail_kernel(taps: tuple[int, ...], fraction_bits: int) -> Kernel:
    """The vertical pass of OpenCV's 8-bit Gaussian, its rounding (half up from 2 * fraction_bits bits) and the
    texture measure |luma - blurred luma|."""
    params = tuple(f"p{index}" for index in range(len(taps)))
    bits = 2 * fraction_bits
    body = (f"T blurred = floorf(({_symmetric_sum(taps, params)} + {_float(1 << (bits - 1))})"
            f" * {_float(2.0 ** -bits)}); return fabsf(centre - blurred);")
    return Kernel(_unique("facefuse_blur_column_detail", body), (*params, "centre"), body)


@functools.lru_cache(maxsize=8)
def float_pass_kernels(taps: tuple[float, ...], subtract_from: bool) -> tuple[tuple[Kernel, tuple[int, ...]], ...]:
    """One pass of a symmetric float32 filter, summed as postprocess_torch._symmetric_pass does (centre times its
    tap, then for each offset from the outside in: tap times the pair's sum, added), split into kernels of at most
    MAX_INPUTS inputs: the first takes (centre, pairs...), each further one (partial sum, pairs...), a pair being the
    values at ``offset`` and ``len(taps) - 1 - offset``. With ``subtract_from`` the last one takes the original values
    as its last input and returns values - filtered (the high-pass). Returns (kernel, its pairs' offsets) in order."""
    radius = len(taps) // 2
    per_kernel = (MAX_INPUTS - 2) // 2  # pairs beside the centre (or partial sum) and the subtrahend
    chunks = [list(range(start, min(radius, start + per_kernel))) for start in range(0, max(radius, 1), per_kernel)]
    kernels = []
    for number, pairs in enumerate(chunks):
        first, last = number == 0, number == len(chunks) - 1
        params = ["centre" if first else "partial"] + [f"{side}{pair}" for pair in pairs for side in "ab"]
        lines = [f"T total = __fmul_rn({_float(taps[radius])}, centre);" if first else "T total = partial;"]
        lines += [f"total = __fadd_rn(total, __fmul_rn({_float(taps[pair])}, __fadd_rn(a{pair}, b{pair})));"
                  for pair in pairs]
        if last and subtract_from:
            params.append("values")
            lines.append("return __fsub_rn(values, total);")
        else:
            lines.append("return total;")
        body = " ".join(lines)
        kernels.append((Kernel(_unique("facefuse_float_pass", body), tuple(params), body), tuple(pairs)))
    return tuple(kernels)


def mark_kernel() -> Kernel:
    """The watermark add of one pixel (its three channels in, three out: one element per pixel, so that no input is
    broadcast over channels, which cost jiterator's indexing 4x the time): the amplitude's vertical interpolation
    (upper row times its weight plus lower row times its weight), times the pattern, rounded half to even and
    clamped to +-256 (cv2.add rounds the float delta), then added to each channel value and saturated to 0..255."""
    saturate = "fminf(fmaxf({} + delta, 0.0f), 255.0f)"
    return Kernel("facefuse_mark",
                  ("red", "green", "blue", "upper", "lower", "upper_weight", "lower_weight", "pattern"),
                  "T amplitude = __fadd_rn(__fmul_rn(upper, upper_weight), __fmul_rn(lower, lower_weight)); "
                  "T delta = fminf(fmaxf(rintf(__fmul_rn(amplitude, pattern)), -256.0f), 256.0f); "
                  + " ".join(f"{channel}_out = {saturate.format(channel)};" for channel in ("red", "green", "blue")),
                  outputs=("red_out", "green_out", "blue_out"))


# ---------------------------------------------------------------------------------------------------------------
# Launching.

# Runs a kernel over broadcast inputs: its result (float32), or a tuple of them for a kernel with ``outputs``.
Launcher = Callable[[Kernel, Sequence[torch.Tensor]], torch.Tensor | tuple[torch.Tensor, ...]]


@functools.lru_cache(maxsize=8)
def one(device: torch.device) -> torch.Tensor:
    """A float32 1 on ``device``: the input that makes a kernel over uint8 pixels run in float32."""
    return torch.ones((), device=device)


@functools.lru_cache(maxsize=64)
def _jitted(kernel: Kernel) -> Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]:
    if kernel.outputs:
        return torch.cuda.jiterator._create_multi_output_jit_fn(kernel.source, num_outputs=len(kernel.outputs))
    return torch.cuda.jiterator._create_jit_fn(kernel.source)


def jiterator_launch(kernel: Kernel, inputs: Sequence[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Runs ``kernel`` over the broadcast ``inputs`` (CUDA tensors) into new float32 tensors."""
    if len(inputs) != len(kernel.params):
        raise ValueError(f"{kernel.name} takes {len(kernel.params)} inputs, got {len(inputs)}")
    result = _jitted(kernel)(*inputs)
    results = tuple(result) if kernel.outputs else (result,)
    if len(results) != max(1, len(kernel.outputs)) or any(out.dtype != torch.float32 for out in results):
        raise TypeError(f"{kernel.name} gave {[out.dtype for out in results]}, expected float32 (give it a float "
                        "input)")
    return results if kernel.outputs else result


def self_check(device: torch.device, launch: Launcher = jiterator_launch) -> None:
    """Compiles and runs a small kernel of each kind and checks what needs checking beyond compiling (the order of
    the mark's outputs): a host where this fails (no NVRTC, an old driver) keeps the torch path as a whole."""
    values = torch.arange(24, dtype=torch.float32, device=device).reshape(2, 12)
    pixel = values.to(torch.uint8)
    launch(luma_kernel((9798, 19235, 3735), 15), [pixel, pixel, pixel, one(device)])
    launch(blur_u8_row_kernel((1, 2, 1)), [values, values, values])
    launch(column_detail_kernel((1, 2, 1), 8), [values, values, values, values])
    for kernel, _ in float_pass_kernels((0.25, 0.5, 0.25), True):
        launch(kernel, [values] * len(kernel.params))
    # The mark's outputs in order, each its own channel (a swapped or merged output would colour the marks).
    red, green, blue = launch(mark_kernel(), [pixel, pixel + 1, pixel + 2] + [values * 0] * 5)
    if not (torch.equal(red, values) and torch.equal(green, values + 1) and torch.equal(blue, values + 2)):
        raise RuntimeError("the mark kernel's outputs came back out of order")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=8)
def _cuda_launcher(device: torch.device) -> Launcher | None:
    try:
        self_check(device)
    except Exception as error:  # noqa: BLE001 - any failure (no NVRTC, an old driver) means: the torch path
        print(f"[facefuse] fused CUDA kernels unavailable on {device} ({type(error).__name__}: {error}); "
              "the watermark uses the torch path", file=sys.stderr, flush=True)
        return None
    return jiterator_launch


def launcher(device: torch.device) -> Launcher | None:
    """How to run the fused kernels on ``device``, or None: use the torch path (CPU tensors, a GPU host where the
    kernels do not compile, or FACEFUSE_FUSED_KERNELS=off)."""
    if device.type != "cuda" or os.environ.get(ENVIRONMENT_VARIABLE, "auto").lower() in ("off", "0", "no"):
        return None
    return _cuda_launcher(torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index))

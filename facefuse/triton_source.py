"""The OpenAI Triton kernels' source (``facefuse.triton_kernels`` loads it, checks inputs and launches them).

Imported by path, once per mode (``triton_kernels._kernels``): ``triton.jit`` decides at decoration time, from
TRITON_INTERPRET, whether a kernel compiles for the GPU or runs in Triton's interpreter (the tests, on CPU tensors),
and a kernel finds its helper functions among its module's globals. Needs triton (CUDA builds of torch bring it).

Every kernel computes what the torch path computes, one rounding per operation in the same order (they compile
without FMA contraction), so the results are bit-identical to it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def facefuse_mark_planes(rgb, image_stride, row_stride, pixel_stride, channel_stride, rows, upper_row, lower_row,
                         upper_weight, lower_weight, tile, planes, height, width, small_height, period, magic,
                         BLOCK: tl.constexpr):
    """The watermark's add: pixels (any strides) plus the tile times the amplitude (interpolated vertically from
    its full-width rows), rounded half to even, saturated, stored as uint8 planes. Grid: (image row, image, blocks
    of the row)."""
    y = tl.program_id(0)
    image = tl.program_id(1).to(tl.int64)
    xs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    inside = xs < width
    row_base = image * small_height * width
    upper = tl.load(rows + row_base + tl.load(upper_row + y) * width + xs, mask=inside, other=0.0)
    lower = tl.load(rows + row_base + tl.load(lower_row + y) * width + xs, mask=inside, other=0.0)
    amplitude = upper * tl.load(upper_weight + y) + lower * tl.load(lower_weight + y)
    pattern = tl.load(tile + (image * period + y % period) * period + xs % period, mask=inside, other=0.0)
    # Clamped before rounding so that the rounding trick holds; the +-256 clamp after it gives what rounding
    # first and clamping after would.
    product = tl.minimum(tl.maximum(amplitude * pattern, -512.0), 512.0)
    delta = tl.minimum(tl.maximum((product + magic) - magic, -256.0), 256.0)
    pixel = image * image_stride + y.to(tl.int64) * row_stride + xs.to(tl.int64) * pixel_stride
    plane = height.to(tl.int64) * width
    for channel in tl.static_range(3):
        value = tl.load(rgb + pixel + channel * channel_stride, mask=inside, other=0).to(tl.float32)
        value = tl.minimum(tl.maximum(value + delta, 0.0), 255.0)
        tl.store(planes + (image * 3 + channel) * plane + y * width + xs, value.to(tl.uint8), mask=inside)


@triton.jit
def facefuse_block_means(pixels, means, height, width, out_height, out_width, divisor, FACTOR: tl.constexpr,
                         BLOCK: tl.constexpr):
    """FACTOR x FACTOR block means of uint8 planes as float32 (avg_pool2d's values). Grid: (output row, plane,
    blocks of the output row)."""
    y = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    xs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    inside = xs < out_width
    source = pixels + plane * height * width + (y * FACTOR).to(tl.int64) * width + xs * FACTOR
    total = xs.to(tl.float32) * 0.0  # (tl.zeros is a jitted helper the interpreter cannot reach from here)
    for dy in tl.static_range(FACTOR):  # integer sums below 2**24: exact in float32 in any order
        for dx in tl.static_range(FACTOR):
            total += tl.load(source + dy * width + dx, mask=inside, other=0).to(tl.float32)
    # div_rn: IEEE division, as avg_pool2d's (a plain / compiles to the approximate div.full.f32: differed on a GPU)
    tl.store(means + (plane * out_height + y) * out_width + xs, tl.math.div_rn(total, divisor), mask=inside)


@triton.jit
def _reflect_101(index, length):
    """BORDER_REFLECT_101 (...cb|abc|ba...) for indices at most one side's length outside."""
    index = tl.where(index < 0, -index, index)
    return tl.where(index > length - 1, 2 * (length - 1) - index, index)


@triton.jit
def _blur_row_pass(plane, row, columns, width, edge_tap, near_tap, centre_tap):
    """The 5-tap blur's horizontal pass over one luma row at ``columns`` (int32, exact)."""
    source = plane + row.to(tl.int64) * width
    total = centre_tap * tl.load(source + columns).to(tl.int32)
    total += near_tap * (tl.load(source + _reflect_101(columns - 1, width)).to(tl.int32)
                         + tl.load(source + _reflect_101(columns + 1, width)).to(tl.int32))
    total += edge_tap * (tl.load(source + _reflect_101(columns - 2, width)).to(tl.int32)
                         + tl.load(source + _reflect_101(columns + 2, width)).to(tl.int32))
    return total


@triton.jit
def _add(left, right):
    return left + right


@triton.jit
def facefuse_watermark_detail(luma, detail, height, width, out_height, out_width, edge_tap, near_tap, centre_tap,
                              FACTOR: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """The texture map: |luma - 8-bit GaussianBlur(luma, 5 taps)| summed over FACTOR x FACTOR blocks, rounded half
    to even (FACTOR**2 = 2**SHIFT), stored as uint8. Grid: (output row, image, blocks of BLOCK output cells)."""
    y = tl.program_id(0)
    image = tl.program_id(1).to(tl.int64)
    cells = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    # (cell, column in its block); cells past the row's end redo its last block and are not stored
    columns = tl.minimum(cells, out_width - 1)[:, None] * FACTOR + tl.arange(0, FACTOR)[None, :]
    plane = luma + image * height * width
    top = y * FACTOR
    # The vertical pass's five rows of horizontal sums, moved down one row per step (the loop unrolls).
    above2 = _blur_row_pass(plane, _reflect_101(top - 2, height), columns, width, edge_tap, near_tap, centre_tap)
    above1 = _blur_row_pass(plane, _reflect_101(top - 1, height), columns, width, edge_tap, near_tap, centre_tap)
    centre = _blur_row_pass(plane, top, columns, width, edge_tap, near_tap, centre_tap)
    below1 = _blur_row_pass(plane, _reflect_101(top + 1, height), columns, width, edge_tap, near_tap, centre_tap)
    total = cells * 0
    for step in tl.static_range(FACTOR):
        below2 = _blur_row_pass(plane, _reflect_101(top + step + 2, height), columns, width, edge_tap, near_tap,
                                centre_tap)
        blurred = centre_tap * centre + near_tap * (above1 + below1) + edge_tap * (above2 + below2)
        blurred = (blurred + (1 << 15)) >> 16  # 8 + 8 fraction bits, rounded half up: cv2's 8-bit blur
        own = tl.load(plane + (top + step).to(tl.int64) * width + columns).to(tl.int32)
        # (tl.reduce with a combine function of this module: tl.sum is a jitted helper of Triton's own, which the
        # tests' interpreter cannot call when triton was imported before TRITON_INTERPRET was set)
        total += tl.reduce(tl.abs(own - blurred), 1, _add)
        above2, above1, centre, below1 = above1, centre, below1, below2
    # INTER_AREA's whole-factor mean: sum / 2**SHIFT rounded half to even, in integers (exact)
    quotient = total >> SHIFT
    remainder = total - (quotient << SHIFT)
    half = 1 << (SHIFT - 1)
    quotient += ((remainder > half) | ((remainder == half) & ((quotient & 1) == 1))).to(tl.int32)
    tl.store(detail + (image * out_height + y) * out_width + cells, quotient.to(tl.uint8), mask=cells < out_width)

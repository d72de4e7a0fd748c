"""facefuse.triton_kernels: the watermark's add as one Triton kernel, run here in Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1; on a GPU host the same kernel compiles), against the torch path bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facefuse import postprocess_torch as pt
from facefuse import triton_kernels
from facefuse.imaging import decode_image
from facefuse.samples import sample_image_path

triton = pytest.importorskip("triton", reason="triton is pinned in requirements.txt; without it nothing here runs")


@pytest.fixture
def interpreted(monkeypatch):
    """The Triton kernel in the interpreter, chosen for CPU tensors as it is for CUDA ones on a GPU host."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_kernels, "use_triton_mark", lambda device: True)


def _torch_path(images, ids):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_kernels, "use_triton_mark", lambda device: False)
        return pt.embed_watermarks_torch(images, ids)


@pytest.fixture(scope="module")
def small_photo() -> np.ndarray:
    return np.ascontiguousarray(decode_image(sample_image_path("t1.jpg").read_bytes())[300:580, 400:761])


def test_watermark_with_the_triton_kernel_equals_the_torch_path(interpreted, small_photo):
    """Two same-size images in one pass (one of them an HxWx3 view of channel planes, as nvJPEG's are), an odd size
    alone, and a size the tile does not divide: every pixel as the torch path gives it."""
    planes = torch.from_numpy(small_photo[::-1].copy()).permute(2, 0, 1).contiguous()
    rng = np.random.default_rng(3)
    odd = rng.integers(0, 256, (203, 331, 3), dtype=np.uint8)
    images = [torch.from_numpy(small_photo), planes.permute(1, 2, 0), torch.from_numpy(odd)]
    assert not images[1].is_contiguous()
    ids = [7, 2**63 + 1, 12345]
    marked = pt.embed_watermarks_torch(images, ids)
    for got, want, image in zip(marked, _torch_path(images, ids), images):
        assert got.shape == image.shape and got.dtype == torch.uint8
        assert torch.equal(got, want)
        assert not torch.equal(got, image)  # a mark was added


def test_mark_planes_rounds_halves_to_even_and_saturates(interpreted):
    """Deltas exactly between two integers round to the even one (cv2.add's rounding), large ones clamp to +-256
    and the sums to 0..255: the kernel's self-check, and a case built to need each rule."""
    triton_kernels._self_check(torch.device("cpu"))
    rgb = torch.tensor([[[[10, 250, 3], [100, 100, 100], [0, 255, 128], [7, 8, 9]]]], dtype=torch.uint8)
    rows = torch.ones((1, 1, 4))
    index, weight = torch.zeros(1, dtype=torch.int64), torch.ones(1)
    tile = torch.tensor([[[2.5, -3.5], [0.0, 0.0]]])
    planes = triton_kernels.mark_planes(rgb, rows, index, index, weight, 0 * weight, tile)
    expected = torch.tensor([[[12, 252, 5], [96, 96, 96], [2, 255, 130], [3, 4, 5]]], dtype=torch.uint8)
    assert torch.equal(planes[0].permute(1, 2, 0), expected)
    tile = torch.tensor([[[1000.0, -1000.0], [0.0, 0.0]]])
    planes = triton_kernels.mark_planes(rgb, rows, index, index, weight, 0 * weight, tile)
    assert planes[0].permute(1, 2, 0)[0, :2].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_self_check_catches_fma_contraction(monkeypatch):
    """A kernel whose interpolation rounds once (as an FMA would: float64 here) in place of after each operation
    fails the self-check a GPU host runs before using the kernel."""
    def contracted(rgb, rows, upper_row, lower_row, upper_weight, lower_weight, tile):
        amplitude = (rows[:, upper_row].double() * upper_weight[:, None].double()
                     + rows[:, lower_row].double() * lower_weight[:, None].double()).float()
        height, width = rgb.shape[1:3]
        pattern = tile.repeat(1, -(-height // tile.shape[1]), -(-width // tile.shape[2]))[:, :height, :width]
        delta = torch.round(amplitude * pattern).clamp(-256, 256).to(torch.int64)
        return (rgb.to(torch.int64) + delta[..., None]).clamp(0, 255).to(torch.uint8).permute(0, 3, 1, 2)

    monkeypatch.setattr(triton_kernels, "mark_planes", contracted)
    with pytest.raises(RuntimeError, match="self-check gave other pixels"):
        triton_kernels._self_check(torch.device("cpu"))


def test_the_comparison_can_fail(interpreted, small_photo):
    """The equality above can fail: the upper and lower rows' weights swapped give other pixels."""
    image = torch.from_numpy(small_photo)
    right = triton_kernels.mark_planes

    def swapped(rgb, rows, upper_row, lower_row, upper_weight, lower_weight, tile):
        return right(rgb, rows, upper_row, lower_row, lower_weight, upper_weight, tile)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_kernels, "mark_planes", swapped)
        marked = pt.embed_watermarks_torch([image], [7])[0]
    assert not torch.equal(marked, _torch_path([image], [7])[0])


def test_the_triton_kernel_is_chosen_only_where_it_may_run(monkeypatch, capsys):
    """Never for CPU tensors; not on CUDA under FACEFUSE_FUSED_KERNELS=jiterator or off; a kernel that fails its
    compile or self-check leaves the jiterator kernel in use, said once on stderr."""
    assert not triton_kernels.use_triton_mark(torch.device("cpu"))
    for setting in ("jiterator", "off"):
        monkeypatch.setenv(pt.fused_kernels.ENVIRONMENT_VARIABLE, setting)
        assert not triton_kernels.use_triton_mark(torch.device("cuda", 0))

    def failing(device):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(triton_kernels, "_self_check", failing)
    assert triton_kernels._available_on.__wrapped__(torch.device("cuda", 0)) is False
    message = capsys.readouterr().err
    assert "Triton mark kernel is unavailable on cuda:0 (RuntimeError: Failed to find C compiler" in message
    assert "uses the jiterator kernel" in message


def test_mark_planes_rejects_mismatched_inputs():
    rgb = torch.zeros((2, 4, 5, 3), dtype=torch.uint8)
    index, weight = torch.zeros(4, dtype=torch.int64), torch.ones(4)
    with pytest.raises(ValueError, match="rows"):
        triton_kernels.mark_planes(rgb, torch.ones((1, 2, 5)), index, index, weight, weight, torch.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="tile"):
        triton_kernels.mark_planes(rgb, torch.ones((2, 2, 5)), index, index, weight, weight, torch.ones((2, 4, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host (CI: CPU only)")
def test_triton_kernel_on_cuda_equals_the_jiterator_and_torch_paths(small_photo, monkeypatch):
    device = torch.device("cuda")
    assert triton_kernels.use_triton_mark(device), "the Triton mark kernel did not compile on this GPU host"
    images = [torch.from_numpy(small_photo).to(device), torch.from_numpy(small_photo[::-1].copy()).to(device)]
    results = {}
    for setting in ("auto", "jiterator", "off"):
        monkeypatch.setenv(pt.fused_kernels.ENVIRONMENT_VARIABLE, setting)
        results[setting] = pt.embed_watermarks_torch(images, [1, 2])
    for auto, jiterator, plain in zip(results["auto"], results["jiterator"], results["off"]):
        assert torch.equal(auto, jiterator) and torch.equal(auto, plain)


def _check_on_by_default(monkeypatch, use, variable: str, kernel: str) -> None:
    """A default-on Triton kernel's selection: never on the CPU, off by its variable, on by default where the device's
    kernel compiles and passes its self-check, off under FACEFUSE_FUSED_KERNELS=jiterator."""
    assert not use(torch.device("cpu"))
    monkeypatch.setenv(variable, "off")
    assert not use(torch.device("cuda", 0))
    monkeypatch.delenv(variable)
    monkeypatch.setattr(triton_kernels, "_available_on", lambda device, name: name == kernel)
    assert use(torch.device("cuda", 0))
    monkeypatch.setenv(triton_kernels.fused_kernels.ENVIRONMENT_VARIABLE, "jiterator")
    assert not use(torch.device("cuda", 0))
    monkeypatch.delenv(triton_kernels.fused_kernels.ENVIRONMENT_VARIABLE)


def test_block_means_equal_avg_pool2d(monkeypatch):
    """The Triton block means (interpreter) give avg_pool2d's float values bit for bit, odd sizes whose last blocks
    do not fit included; the self-check passes; on CUDA by default, off by its variable or under
    FACEFUSE_FUSED_KERNELS=jiterator, never on the CPU; the detector's shrink takes them when selected."""
    from facefuse import detection

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rng = np.random.default_rng(11)
    for shape, factor in (((2, 3, 36, 64), 3), ((1, 3, 29, 47), 2), ((3, 1, 17, 33), 4)):
        pixels = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
        means = triton_kernels.block_means(pixels, factor)
        assert means.dtype == torch.float32
        assert torch.equal(means, torch.nn.functional.avg_pool2d(pixels.float(), factor))
    triton_kernels._block_means_self_check(torch.device("cpu"))
    _check_on_by_default(monkeypatch, triton_kernels.use_triton_shrink, triton_kernels.SHRINK_VARIABLE, "block means")
    monkeypatch.setattr(triton_kernels, "use_triton_shrink", lambda device: True)
    calls = []
    monkeypatch.setattr(triton_kernels, "block_means", lambda p, f: calls.append(f) or torch.zeros(1))
    detection.shrink_by_whole_factor(pixels, 4)
    assert calls == [4]


def test_block_means_comparison_can_fail_and_bad_input_is_refused(monkeypatch):
    """A kernel that leaves out each block's bottom-right pixel fails the self-check; non-uint8 input is refused."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    right = triton_kernels.block_means

    def without_a_corner(pixels, factor):
        rows, columns = pixels.shape[2] // factor * factor, pixels.shape[3] // factor * factor
        last = pixels.float()[..., factor - 1:rows:factor, factor - 1:columns:factor]
        return right(pixels, factor) - last / factor ** 2

    monkeypatch.setattr(triton_kernels, "block_means", without_a_corner)
    with pytest.raises(RuntimeError, match="block-means kernel's self-check"):
        triton_kernels._block_means_self_check(torch.device("cpu"))
    with pytest.raises(ValueError, match="block_means"):
        right(torch.zeros((1, 3, 4, 4)), 2)


def test_texture_map_equals_the_torch_path(monkeypatch, small_photo):
    """The one-pass texture map (interpreter) gives the torch path's uint8 values (OpenCV's blur and area mean) for
    the self-check's luma, whose cells include exact halves with even and odd quotients, for float and int luma;
    through the whole watermark the marked image is the torch path's; only sides that 8 divides take it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    luma = triton_kernels.detail_self_check_luma()
    detail = torch.abs(luma - pt._gaussian_blur_u8(luma, pt.DETAIL_KSIZE, pt.DETAIL_SIGMA)).float()
    sums = torch.nn.functional.avg_pool2d(detail[:, None], 8, divisor_override=1).long()
    halves = sums[sums % 64 == 32] // 64
    assert {0, 1} <= set((halves % 2).tolist()), "the self-check's luma lost its exact halves"
    taps = pt.detail_taps()
    for values in (luma, luma.float(), luma[:1, :24, 8:48]):
        got = triton_kernels.watermark_detail(values, taps, 8)
        assert got.dtype == torch.uint8 and torch.equal(got, pt.detail_map_reference(values.to(torch.int32)))
    triton_kernels._detail_self_check(torch.device("cpu"))

    image = torch.from_numpy(np.ascontiguousarray(small_photo[:96, :136]))
    odd = torch.from_numpy(np.ascontiguousarray(small_photo[:90, :131]))
    calls = []
    right = triton_kernels.watermark_detail
    monkeypatch.setattr(triton_kernels, "use_triton_detail", lambda device: True)
    monkeypatch.setattr(triton_kernels, "watermark_detail", lambda *args: calls.append(args[0].shape) or right(*args))
    marked = pt.embed_watermarks_torch([image, odd], [5, 6])
    assert calls == [(1, 96, 136)]  # 90 x 131 is not a multiple of 8: the jiterator/torch path
    monkeypatch.setattr(triton_kernels, "use_triton_detail", lambda device: False)
    for got, want in zip(marked, pt.embed_watermarks_torch([image, odd], [5, 6])):
        assert torch.equal(got, want)


def test_texture_map_self_check_catches_rounding_halves_up(monkeypatch):
    """A kernel rounding the area mean's halves up (as cv2 does for 2x2 blocks only) fails the self-check; factors
    and sizes the kernel does not compute exactly are refused; on by default, never on the CPU, off by its variable
    or under FACEFUSE_FUSED_KERNELS=jiterator."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def halves_up(luma, taps, factor):
        detail = torch.abs(luma.to(torch.int32) - pt._gaussian_blur_u8(luma.to(torch.int32), 5, 1.2)).float()
        sums = torch.nn.functional.avg_pool2d(detail[:, None], factor, divisor_override=1)[:, 0]
        return torch.floor((sums + factor * factor // 2) / (factor * factor)).to(torch.uint8)

    monkeypatch.setattr(triton_kernels, "watermark_detail", halves_up)
    with pytest.raises(RuntimeError, match="texture-map kernel's self-check"):
        triton_kernels._detail_self_check(torch.device("cpu"))
    monkeypatch.undo()
    for shape, factor in (((1, 16, 16), 2), ((1, 16, 16), 6), ((1, 20, 16), 8), ((16, 16), 8)):
        with pytest.raises(ValueError, match="watermark_detail"):
            triton_kernels.watermark_detail(torch.zeros(shape), pt.detail_taps(), factor)
    _check_on_by_default(monkeypatch, triton_kernels.use_triton_detail, triton_kernels.DETAIL_VARIABLE, "texture map")


@pytest.mark.parametrize("kernel, signature, constants", [
    ("facefuse_mark_planes", "*u8 i64 i64 i64 i64 *fp32 *i64 *i64 *fp32 *fp32 *fp32 *u8 i32 i32 i32 i32 fp32",
     {"BLOCK": 512}),
    ("facefuse_block_means", "*u8 *fp32 i32 i32 i32 i32 fp32", {"FACTOR": 3, "BLOCK": 256}),
    ("facefuse_watermark_detail", "*fp32 *u8 i32 i32 i32 i32 i32 i32 i32", {"FACTOR": 8, "SHIFT": 6, "BLOCK": 64}),
])
def test_kernels_compile_for_a_hopper_gpu(kernel, signature, constants):
    """The kernels as the service compiles them (not the interpreter: no TRITON_INTERPRET, helper functions found in
    their module, no FMA contraction) down to a cubin for sm_90, which this CPU-only host can do with Triton's own
    ptxas: what the interpreter tests cannot show about the GPU build."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    function = getattr(triton_kernels._kernels(False), kernel)
    names = [name for name in function.arg_names if name not in constants]
    types = dict(zip(names, signature.split(), strict=True)) | {name: "constexpr" for name in constants}
    compiled = triton.compile(ASTSource(function, types, constexprs=constants), target=GPUTarget("cuda", 90, 32),
                              options={"enable_fp_fusion": False})
    assert kernel in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 1000
    ptx = compiled.asm["ptx"]
    assert "fma.rn.f32" not in ptx  # every product and sum rounds on its own
    # Divisions correctly rounded, as torch's: Triton's plain "/" compiles to div.full.f32 (2 ulp), which made the
    # block means differ from avg_pool2d on an H100 (session 17; its self-check caught it)
    assert "div.full" not in ptx and "div.approx" not in ptx


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host (CI: CPU only)")
def test_texture_map_and_block_means_compile_and_match_on_cuda():
    """On a GPU host: both kernels pass their self-checks there, and on 1080p-sized inputs the texture map equals the
    torch path and the block means equal avg_pool2d, bit for bit (session 17: an approximate division did not)."""
    device = torch.device("cuda")
    assert triton_kernels._available_on.__wrapped__(device, "texture map")
    assert triton_kernels._available_on.__wrapped__(device, "block means")
    generator = torch.Generator(device=device).manual_seed(17)
    luma = torch.randint(0, 256, (2, 1080, 1920), generator=generator, device=device, dtype=torch.int32)
    detail = triton_kernels.watermark_detail(luma.float(), pt.detail_taps(), pt.AMPLITUDE_REDUCTION)
    assert torch.equal(detail, pt.detail_map_reference(luma))
    pixels = torch.randint(0, 256, (2, 3, 1080, 1920), generator=generator, device=device, dtype=torch.uint8)
    for factor in (2, 3, 4):
        assert torch.equal(triton_kernels.block_means(pixels, factor),
                           torch.nn.functional.avg_pool2d(pixels.float(), factor))

"""facefuse.postprocess_torch against the OpenCV/numpy postprocess it replaces (torch on the CPU here; the same code
runs on CUDA). Parity is asserted on measured differences: exact for the integer building blocks, at most 1 grey
level on a small fraction of pixels for paste-back and the watermark."""

from __future__ import annotations

import dataclasses
import io
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from facefuse import postprocess_torch as pt
from facefuse.alignment import CROP_SIZE, crop_to_tensor, warp_to_crop
from facefuse.imaging import decode_image, encode_image, insert_jpeg_xmp
from facefuse.options import FusionOptions
from facefuse.pipeline import finish, paste_back
from facefuse.provenance import build_xmp, read_provenance
from facefuse.samples import sample_image_path
from facefuse.watermark import _amplitude, _earlier_mark, _period, embed_watermark, extract_watermark
from tests import kernel_emulator

WID = 0x0123456789ABCDEF
WID_HEX = "0123456789abcdef"
# Parity bounds, from measurements (all differences were 0 on this machine; the bounds leave room for another
# summation order, e.g. FMA on another CPU or on CUDA, to flip a rounding now and then).
MAX_LEVELS = 1
MAX_DIFFERING = 1e-3  # fraction of pixel values allowed to differ (by MAX_LEVELS at most)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return decode_image(sample_image_path("t1.jpg").read_bytes())  # 1280x886


@pytest.fixture(scope="module")
def full_hd(photo) -> np.ndarray:
    return cv2.resize(photo, (1920, 1080), interpolation=cv2.INTER_LINEAR)


@pytest.fixture(scope="module")
def generated() -> np.ndarray:
    """517x333 (odd sizes: OpenCV's non-integer area paths): gradients, hard-edged shapes and noise."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:333, :517]
    rgb = np.stack([xx * 255.0 / 517, yy * 255.0 / 333, 128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)], -1)
    rgb[40:120, 60:200] = (250, 20, 30)
    rgb[200:300, 300:480] = (5, 5, 5)
    rgb += rng.normal(0, 12, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _similarity(centre: tuple[float, float], footprint: float, degrees: float) -> np.ndarray:
    """Image -> crop matrix putting a footprint-px square around centre (rotated) onto the CROP_SIZE crop."""
    angle, scale = math.radians(degrees), CROP_SIZE / footprint
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    matrix = np.zeros((2, 3))
    matrix[:, :2] = rotation
    matrix[:, 2] = CROP_SIZE / 2.0 - rotation @ np.asarray(centre, dtype=np.float64)
    return matrix.astype(np.float32)


def _crop_and_mask(image: np.ndarray, matrix: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fused crop that differs from the target (brightened, plus noise: sharp detail for the interpolation) and a
    soft mask that over- and undershoots [0, 1] (the clip is part of what must match)."""
    rng = np.random.default_rng(seed)
    crop = warp_to_crop(image, matrix).astype(np.float32) * 1.1 + 15 + rng.normal(0, 20, (CROP_SIZE, CROP_SIZE, 3))
    tensor = crop_to_tensor(np.clip(crop, 0, 255).astype(np.uint8))
    yy, xx = np.mgrid[:CROP_SIZE, :CROP_SIZE] / (CROP_SIZE - 1.0) - 0.5
    mask = ((0.45 - np.hypot(xx, 0.8 * yy)) / 0.1).astype(np.float32)[None]
    return tensor, np.clip(mask, -0.3, 1.3)


def _difference(expected: np.ndarray, actual: np.ndarray) -> tuple[int, float, float]:
    """(max |difference| in grey levels, mean |difference|, fraction of values that differ)."""
    assert expected.shape == actual.shape and expected.dtype == actual.dtype == np.uint8
    diff = np.abs(expected.astype(np.int16) - actual.astype(np.int16))
    return int(diff.max()), float(diff.mean()), float(np.mean(diff > 0))


def _assert_parity(expected: np.ndarray, actual: np.ndarray) -> None:
    worst, mean, differing = _difference(expected, actual)
    assert worst <= MAX_LEVELS and differing <= MAX_DIFFERING, (worst, mean, differing)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks: OpenCV's integer arithmetic reproduced exactly.


def test_luma_blur_and_area_resize_are_bit_exact(photo, generated):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (211, 307, 3), dtype=np.uint8)
    for image in (photo, generated, noise):
        luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        luma_t = pt._luma(torch.from_numpy(image))
        assert np.array_equal(luma_t.numpy(), luma)
        assert np.array_equal(pt._gaussian_blur_u8(luma_t, 5, 1.2).numpy(), cv2.GaussianBlur(luma, (5, 5), 1.2))
        height, width = luma.shape
        # Integer factors (OpenCV's fast path; 2x2 rounds half up there) on whole blocks, then the general table.
        cases = [(luma[: height // f * f, : width // f * f], (height // f, width // f)) for f in (8, 2, 3)]
        cases += [(luma, size) for size in ((height // 8, width // 8), (round(height / 1.65), round(width / 1.65)),
                                            (height // 7 + 1, width // 5 + 3))]
        for region, size in cases:
            expected = cv2.resize(region, (size[1], size[0]), interpolation=cv2.INTER_AREA)
            actual = pt._area_resize(torch.from_numpy(region).to(torch.int32), *size).numpy()
            assert np.array_equal(actual, expected), (image.shape, size)


def test_amplitude_map_and_earlier_mark_match_the_watermark_module(photo, full_hd):
    for image in (photo, full_hd):
        luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        luma_t = torch.from_numpy(luma).to(torch.int32)
        assert np.array_equal(pt._amplitude_small(luma_t), _amplitude(luma))
        period = _period(*luma.shape)
        assert pt._earlier_mark_small(luma_t, period) is None and _earlier_mark(luma, period) is None
        marked = cv2.cvtColor(embed_watermark(image, WID), cv2.COLOR_RGB2GRAY)
        expected = _earlier_mark(marked, period)
        actual = pt._earlier_mark_small(torch.from_numpy(marked).to(torch.int32), period)
        assert expected is not None and actual is not None
        assert actual[0] == expected[0] == WID
        assert actual[1] == pytest.approx(expected[1], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Paste back.


@pytest.mark.parametrize("case", ["inside rotated", "larger than the crop", "smaller than the crop", "over the corner"])
def test_paste_back_matches_cv2(photo, generated, case):
    image, matrix = {
        "inside rotated": (photo, _similarity((610.0, 380.0), 300.0, 17.0)),
        "larger than the crop": (photo, _similarity((640.0, 450.0), 700.0, -8.0)),
        "smaller than the crop": (generated, _similarity((250.0, 160.0), 120.3, 33.0)),
        "over the corner": (generated, _similarity((20.0, 310.0), 200.0, 5.0)),
    }[case]
    crop, mask = _crop_and_mask(image, matrix, seed=len(case))
    expected = paste_back(image, crop, mask, matrix)
    target = torch.from_numpy(image)
    actual = pt.paste_back_torch(target, torch.from_numpy(crop), torch.from_numpy(mask), matrix).numpy()
    assert np.array_equal(target.numpy(), image)  # the input is not modified
    assert (expected != image).any(axis=2).sum() > 1000  # the paste did change many pixels
    _assert_parity(expected, actual)


def test_paste_back_parity_bound_catches_a_half_pixel_error(photo):
    """Negative control: the same paste half a pixel off (the classic align_corners / pixel-centre mistake) is far
    outside the bound the parity tests use."""
    matrix = _similarity((610.0, 380.0), 300.0, 17.0)
    crop, mask = _crop_and_mask(photo, matrix, seed=1)
    expected = paste_back(photo, crop, mask, matrix)
    shifted = matrix.copy()
    shifted[:, 2] += 0.5
    actual = pt.paste_back_torch(torch.from_numpy(photo), torch.from_numpy(crop), torch.from_numpy(mask), shifted)
    worst, _, differing = _difference(expected, actual.numpy())
    assert worst > 10 * MAX_LEVELS and differing > 10 * MAX_DIFFERING


def test_paste_back_outside_the_image_is_a_copy(generated):
    matrix = _similarity((-500.0, -500.0), 200.0, 0.0)
    crop, mask = _crop_and_mask(generated, np.eye(2, 3, dtype=np.float32), seed=0)
    target = torch.from_numpy(generated)
    out = pt.paste_back_torch(target, torch.from_numpy(crop), torch.from_numpy(mask), matrix)
    assert torch.equal(out, target) and out.data_ptr() != target.data_ptr()


def test_paste_back_of_rows_equals_one_at_a_time_and_keeps_failures_in_place(photo, generated):
    # One upload of every row's warp tables (paste_back_rows_torch); a bad row and a row off the image keep their
    # places, the others paste exactly as alone.
    cases = [(photo, _similarity((610.0, 380.0), 300.0, 17.0)), (generated, _similarity((250.0, 160.0), 120.3, 33.0)),
             (generated, _similarity((-500.0, -500.0), 200.0, 0.0)), (photo, _similarity((640.0, 450.0), 700.0, -8.0))]
    rows = []
    for seed, (image, matrix) in enumerate(cases):
        crop, mask = _crop_and_mask(image, matrix, seed=seed)
        rows.append((torch.from_numpy(image), torch.from_numpy(crop), torch.from_numpy(mask), matrix))
    bad = (rows[0][0], rows[0][1][:, :100], rows[0][2], rows[0][3])  # a crop of the wrong shape
    results = pt.paste_back_rows_torch([rows[0], bad, rows[1], rows[2], rows[3]])
    assert isinstance(results[1], ValueError) and "(3, S, S)" in str(results[1])
    for row, result in zip(rows, [results[0], results[2], results[3], results[4]]):
        assert torch.equal(result, pt.paste_back_torch(*row))
    assert torch.equal(results[3], rows[2][0])  # off the image: an unchanged copy
    assert not torch.equal(results[0], rows[0][0])


# ---------------------------------------------------------------------------------------------------------------
# Watermark.


def test_watermark_matches_embed_watermark(photo, full_hd, generated):
    for image in (photo, full_hd, generated, np.ascontiguousarray(photo[300:364, 600:664])):
        expected = embed_watermark(image, WID, strength=0.8 if image is generated else 1.0)
        actual = pt.embed_watermark_torch(torch.from_numpy(image), WID, 0.8 if image is generated else 1.0)
        assert actual.dtype == torch.uint8 and actual.shape == image.shape
        _assert_parity(expected, actual.numpy())


def test_watermark_in_several_row_bands_matches(photo, monkeypatch):
    monkeypatch.setattr(pt, "_BAND_PIXELS", 1 << 16)  # one tile row per band: 9 bands with a partial last one
    expected = embed_watermark(photo, WID)
    alone = pt.embed_watermark_torch(torch.from_numpy(photo), WID)
    _assert_parity(expected, alone.numpy())
    together = pt.embed_watermarks_torch([torch.from_numpy(photo[::-1].copy()), torch.from_numpy(photo)], [7, WID])
    assert torch.equal(together[1], alone)  # two images share each band


def test_watermark_is_read_back_also_after_jpeg(photo):
    marked = pt.embed_watermark_torch(torch.from_numpy(photo), WID).numpy()
    for image in (marked, decode_image(encode_image(marked, "jpeg", 90))):
        reading = extract_watermark(image)
        assert reading.present and reading.watermark_id == WID_HEX


def test_remarking_replaces_the_earlier_mark_like_embed_watermark(photo):
    first = decode_image(encode_image(embed_watermark(photo, WID), "jpeg", 92))
    new_id = WID ^ 0xFFFFFFFFFFFFFFFF
    expected = embed_watermark(first, new_id)
    actual = pt.embed_watermark_torch(torch.from_numpy(first), new_id).numpy()
    _assert_parity(expected, actual)
    assert extract_watermark(actual).watermark_id == f"{new_id:016x}"


def test_remarking_check_of_a_batch_finds_only_the_marked_row(photo, generated):
    """The re-marking check's fold runs on the device and its pilot search for all rows at once: a batch holding an
    already-marked target and unmarked ones replaces that one mark (as embed_watermark does) and leaves the others
    alone."""
    first = decode_image(encode_image(embed_watermark(photo, WID), "jpeg", 92))
    new_id = WID ^ 0xFFFFFFFFFFFFFFFF
    images = [photo, first, generated]
    batch = pt.embed_watermarks_torch([torch.from_numpy(image) for image in images], [3, new_id, 4])
    for image, watermark_id, marked in zip(images, [3, new_id, 4], batch):
        _assert_parity(embed_watermark(image, watermark_id), marked.numpy())
    assert extract_watermark(batch[1].numpy()).watermark_id == f"{new_id:016x}"


def test_earlier_mark_fold_matches_opencv_high_pass_and_fold(photo):
    rng = np.random.default_rng(4)
    values = rng.random((70, 150), dtype=np.float32) * 255
    expected = cv2.GaussianBlur(values, (0, 0), 2.0)
    np.testing.assert_allclose(pt._gaussian_blur_float(torch.from_numpy(values), 2.0).numpy(), expected, atol=1e-3)
    luma = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    period = _period(*luma.shape)
    small = pt._earlier_mark_samples(torch.from_numpy(luma).to(torch.int32), period).numpy().astype(np.float32)
    size = small.shape[0] // (luma.shape[0] // period)
    high = small - cv2.GaussianBlur(small, (0, 0), 2.0)
    folded = high.reshape(small.shape[0] // size, size, small.shape[1] // size, size).mean(axis=(0, 2))
    actual = pt._earlier_mark_fold(torch.from_numpy(luma).to(torch.int32), period).numpy()
    np.testing.assert_allclose(actual, folded, atol=1e-3)


def test_watermark_small_images_and_bad_arguments(photo):
    tiny = torch.from_numpy(np.ascontiguousarray(photo[:47, :300]))
    out = pt.embed_watermark_torch(tiny, WID)
    assert torch.equal(out, tiny) and out.data_ptr() != tiny.data_ptr()
    image = torch.zeros((64, 64, 3), dtype=torch.uint8)
    for call in (lambda: pt.embed_watermark_torch(image, 1 << 64), lambda: pt.embed_watermark_torch(image, -1),
                 lambda: pt.embed_watermark_torch(image, 1, strength=0.0),
                 lambda: pt.embed_watermark_torch(image.to(torch.float32), 1),
                 lambda: pt.embed_watermark_torch(image[..., :2], 1)):
        with pytest.raises(ValueError):
            call()


# ---------------------------------------------------------------------------------------------------------------
# Encoding.


def test_jpeg_encoder_selection_on_cpu_never_touches_torchvision():
    pt._device_jpeg_encoder.cache_clear()
    assert pt.jpeg_encoder_for(torch.zeros((8, 8, 3), dtype=torch.uint8)) == "pillow"
    assert pt._device_jpeg_encoder.cache_info().misses == 0  # torchvision was not even looked for


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_jpeg_encoder_selection_on_cuda():
    expected = "nvjpeg" if pt._device_jpeg_encoder() is not None else "pillow"
    assert pt.jpeg_encoder_for(torch.zeros((8, 8, 3), dtype=torch.uint8, device="cuda")) == expected


def test_cpu_jpeg_fallback_decodes_and_carries_the_xmp(photo):
    xmp = build_xmp(WID_HEX, "facefuse test")
    data = pt.encode_jpeg_torch(torch.from_numpy(photo), 90, xmp)
    assert data == encode_image(photo, "jpeg", 90, xmp=xmp)  # the host encoder, as documented
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.size == (photo.shape[1], photo.shape[0])
        assert WID_HEX in str(image.getxmp())
    assert read_provenance(data)["watermark_id"] == WID_HEX
    assert pt.encode_jpeg_torch(torch.from_numpy(photo), 90, None)[:2] == b"\xff\xd8"
    with pytest.raises(ValueError):
        pt.encode_jpeg_torch(torch.from_numpy(photo), 0, xmp)


def test_device_jpeg_xmp_goes_after_the_jfif_segment(generated):
    """The XMP insertion of the nvJPEG branch, on a JPEG without XMP: APP0 (JFIF) first, then the APP1 XMP."""
    plain = encode_image(generated, "jpeg", 90)
    assert plain[2:4] == b"\xff\xe0"
    xmp = build_xmp(WID_HEX, "facefuse test")
    data = insert_jpeg_xmp(plain, xmp)
    app0_end = 4 + int.from_bytes(plain[4:6], "big")
    assert data[:app0_end] == plain[:app0_end] and data[app0_end:app0_end + 2] == b"\xff\xe1"
    assert np.array_equal(decode_image(data), decode_image(plain))
    with Image.open(io.BytesIO(data)) as image:
        assert WID_HEX in str(image.getxmp())


# ---------------------------------------------------------------------------------------------------------------
# The whole postprocess.


def _finish_both(image: np.ndarray, options: FusionOptions) -> tuple[tuple[bytes, dict], tuple[bytes, dict]]:
    matrix = _similarity((610.0, 380.0), 300.0, 17.0)
    crop, mask = _crop_and_mask(image, matrix, seed=3)
    expected = finish(image, crop, mask, matrix, options, {"timings_ms": {"decode": 1.0}})
    target = torch.from_numpy(image)
    actual = pt.finish_torch(target, torch.from_numpy(crop), torch.from_numpy(mask), matrix, options,
                             {"timings_ms": {"decode": 1.0}})
    assert np.array_equal(target.numpy(), image)
    return expected, actual


@pytest.mark.parametrize("fmt, label", [("png", False), ("png", True), ("jpeg", False)])
def test_finish_torch_matches_finish(photo, fmt, label):
    options = FusionOptions(format=fmt, quality=90, watermark_id=WID_HEX, visible_label=label)
    (expected, expected_meta), (actual, actual_meta) = _finish_both(photo, options)
    assert set(actual_meta) == set(expected_meta)
    assert set(actual_meta["timings_ms"]) == set(expected_meta["timings_ms"]) == {"decode", "paste", "watermark",
                                                                                  "encode"}
    assert actual_meta["watermark_id"] == WID_HEX and actual_meta["visible_label"] is label
    assert actual_meta["format"] == fmt
    assert actual_meta["output"] == {"width": photo.shape[1], "height": photo.shape[0], "bytes": len(actual)}
    assert read_provenance(actual)["watermark_id"] == WID_HEX
    pixels = decode_image(actual)
    assert pixels.shape == photo.shape
    assert extract_watermark(pixels).watermark_id == WID_HEX
    if fmt == "png":  # lossless: the pixels themselves are compared
        _assert_parity(decode_image(expected), pixels)
    else:  # same pixels, same host encoder
        _, mean, _ = _difference(decode_image(expected), pixels)
        assert mean < 0.01


def test_finish_torch_webp_and_random_id(generated):
    (_, _), (data, metadata) = _finish_both(generated, FusionOptions(format="webp", quality=90))
    assert len(metadata["watermark_id"]) == 16
    assert decode_image(data).shape == generated.shape
    assert read_provenance(data)["watermark_id"] == metadata["watermark_id"]


def test_finish_torch_batch_equals_one_row_at_a_time(photo, generated):
    # Rows of different sizes and formats, one of them broken: the others come out exactly as finish_torch makes
    # them one by one, and the broken one gets its own error.
    matrix = _similarity((610.0, 380.0), 300.0, 17.0)
    small_matrix = _similarity((200.0, 150.0), 120.0, -8.0)
    rows, singles = [], []
    for image, row_matrix, fmt in ((photo, matrix, "jpeg"), (generated, small_matrix, "png"),
                                   (photo, matrix, "jpeg"), (generated, small_matrix, "jpeg")):
        crop, mask = _crop_and_mask(image, row_matrix, seed=len(rows))
        options = FusionOptions(format=fmt, quality=85 + len(rows), watermark_id=WID_HEX)
        rows.append(pt.FinishRow(torch.from_numpy(image), crop, mask, row_matrix, options, {"timings_ms": {}}))
        singles.append(pt.finish_torch(torch.from_numpy(image), crop, mask, row_matrix, options, {"timings_ms": {}}))
    broken = pt.FinishRow(torch.from_numpy(photo), np.zeros((3, 10, 12), np.float32), np.zeros((1, 10, 12)),
                          matrix, FusionOptions(), {"timings_ms": {}})
    results = pt.finish_torch_batch(rows[:2] + [broken] + rows[2:])
    assert isinstance(results[2], ValueError) and "fused crop" in str(results[2])
    for (data, metadata), (expected, expected_metadata) in zip(results[:2] + results[3:], singles):
        assert data == expected
        assert {key: value for key, value in metadata.items() if key != "timings_ms"} == \
            {key: value for key, value in expected_metadata.items() if key != "timings_ms"}
        assert set(metadata["timings_ms"]) == {"paste", "watermark", "encode"}


def test_watermarks_of_a_batch_equal_one_at_a_time(photo, generated):
    images = [torch.from_numpy(photo), torch.from_numpy(generated), torch.zeros((20, 30, 3), dtype=torch.uint8)]
    ids = [1, 2**63 + 5, 7]
    batch = pt.embed_watermarks_torch(images, ids)
    for image, watermark_id, marked in zip(images, ids, batch):
        assert torch.equal(marked, pt.embed_watermark_torch(image, watermark_id))
    assert torch.equal(batch[2], images[2])  # too small to carry a mark: a copy


@pytest.mark.parametrize("per_pass", [8, 2])
def test_watermarks_of_same_size_images_go_through_together_unchanged(photo, per_pass, monkeypatch):
    """Images of one size are analysed as one batch (in passes of _IMAGES_PER_PASS): each result is still exactly
    what the image alone gets, also for an already-marked one among them."""
    monkeypatch.setattr(pt, "_IMAGES_PER_PASS", per_pass)
    marked_before = decode_image(encode_image(embed_watermark(photo, WID), "jpeg", 92))
    images = [torch.from_numpy(image.copy()) for image in (photo, photo[::-1], marked_before, photo[:, ::-1])]
    ids = [11, 12, WID ^ 1, 13]
    batch = pt.embed_watermarks_torch(images, ids)
    for image, watermark_id, marked in zip(images, ids, batch):
        assert torch.equal(marked, pt.embed_watermarks_torch([image], [watermark_id])[0])
    assert extract_watermark(batch[2].numpy()).watermark_id == f"{WID ^ 1:016x}"
    with pytest.raises(ValueError):
        pt.embed_watermarks_torch(images[:2], ids)  # one id per image


def test_fused_crops_as_tensors_finish_like_host_arrays(photo):
    """The fusion model's GPU-memory handoff gives postprocess the crop and mask as tensors (on the GPU; the CPU's
    torch here): the same bytes as from host arrays."""
    matrix = _similarity((610.0, 380.0), 300.0, 17.0)
    crop, mask = _crop_and_mask(photo, matrix, seed=3)
    options = FusionOptions(format="jpeg", quality=90, watermark_id=WID_HEX)
    from_arrays = pt.finish_torch(torch.from_numpy(photo), crop, mask, matrix, options, {"timings_ms": {}})
    from_tensors = pt.finish_torch(torch.from_numpy(photo), torch.from_numpy(crop), torch.from_numpy(mask), matrix,
                                   options, {"timings_ms": {}})
    assert from_tensors[0] == from_arrays[0]


def test_warm_up_runs_one_synthetic_row_through_the_batch_path():
    """The GPU model runs it at load; on the CPU the same code path must complete and report its time."""
    from facefuse.postprocess_torch import warm_up

    assert warm_up(torch.device("cpu"), 320, 240) > 0.0


# ---------------------------------------------------------------------------------------------------------------
# The fused CUDA kernels (facefuse.fused_kernels): their C++ source, compiled here by the host's compiler
# (tests/kernel_emulator.py), in place of jiterator; every fused branch against the torch path, bit for bit.

needs_compiler = pytest.mark.skipif(kernel_emulator.compiler() is None,
                                    reason="no C++ compiler on this host to run the fused kernels' source")


@pytest.fixture
def fused(monkeypatch):
    """postprocess_torch with the fused branches on (CPU tensors through the emulator)."""
    monkeypatch.setattr(pt.fused_kernels, "launcher", lambda device: kernel_emulator.launch)


def _torch_path(function, *args):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pt.fused_kernels, "launcher", lambda device: None)
        return function(*args)


@needs_compiler
def test_fused_luma_detail_and_high_pass_equal_the_torch_path(fused, photo, generated):
    for image in (photo, generated, np.ascontiguousarray(photo[:51, :77])):
        batch = torch.from_numpy(np.stack([image, image[::-1].copy()]))
        luma = pt._luma(batch)
        assert luma.dtype == torch.float32
        assert torch.equal(luma.to(torch.int32), _torch_path(pt._luma, batch))
        assert torch.equal(pt._amplitude_detail(luma), _torch_path(pt._amplitude_detail, luma.to(torch.int32)))
        samples = pt._area_resize(luma, luma.shape[-2] // 2, luma.shape[-1] // 2).to(torch.float32)
        high = pt._high_pass(samples, 2.0)
        assert torch.equal(high, _torch_path(pt._high_pass, samples, 2.0))
        assert torch.equal(high, samples - pt._gaussian_blur_float(samples, 2.0))
    # A single plane (no batch dimension) and cv2's own result.
    luma = cv2.cvtColor(generated, cv2.COLOR_RGB2GRAY)
    blurred = cv2.GaussianBlur(luma, (pt.DETAIL_KSIZE, pt.DETAIL_KSIZE), pt.DETAIL_SIGMA)
    detail = pt._fused_detail(torch.from_numpy(luma), kernel_emulator.launch)
    assert np.array_equal(detail.numpy().astype(np.uint8), cv2.absdiff(luma, blurred))


@needs_compiler
def test_fused_watermark_equals_the_torch_path(fused, photo, full_hd, generated, monkeypatch):
    first = decode_image(encode_image(embed_watermark(photo, WID), "jpeg", 92))  # re-marking: the fold decides
    images = [torch.from_numpy(image) for image in (photo, first, full_hd, generated, photo[::-1].copy())]
    ids = [3, WID ^ 1, 5, 2**63 + 9, 11]
    fused_marks = pt.embed_watermarks_torch(images, ids)
    expected = _torch_path(pt.embed_watermarks_torch, images, ids)
    for got, want in zip(fused_marks, expected):
        assert torch.equal(got, want)
    assert extract_watermark(fused_marks[1].numpy()).watermark_id == f"{WID ^ 1:016x}"
    monkeypatch.setattr(pt, "_BAND_PIXELS", 1 << 16)  # several bands with a partial last one
    assert torch.equal(pt.embed_watermark_torch(images[0], ids[0]), expected[0])


@needs_compiler
def test_fused_kernels_can_fail_the_comparison(fused, photo):
    """The comparisons above can fail: a mark kernel that rounds the delta towards zero (in place of to nearest) is
    caught on one photo."""
    right = pt.fused_kernels.mark_kernel()
    wrong = dataclasses.replace(right, name="facefuse_mark_wrong", body=right.body.replace("rintf(", "truncf("))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pt.fused_kernels, "mark_kernel", lambda: wrong)
        marked = pt.embed_watermark_torch(torch.from_numpy(photo), WID)
    assert not torch.equal(marked, _torch_path(pt.embed_watermark_torch, torch.from_numpy(photo), WID))


def test_fused_kernels_stay_off_on_the_cpu_and_when_switched_off(monkeypatch):
    assert pt.fused_kernels.launcher(torch.device("cpu")) is None
    monkeypatch.setenv(pt.fused_kernels.ENVIRONMENT_VARIABLE, "off")
    assert pt.fused_kernels.launcher(torch.device("cuda", 0)) is None


def test_fused_kernel_sources_fit_jiterator():
    """Each kernel parses as jiterator's one-template-function form and takes at most 8 inputs."""
    from torch.cuda.jiterator import _CodeParser

    fk = pt.fused_kernels
    kernels = [fk.luma_kernel(pt._GRAY_WEIGHTS, pt._GRAY_SHIFT), fk.mark_kernel(),
               fk.blur_u8_row_kernel(pt._fixed_point_gaussian(5, 1.2)),
               fk.column_detail_kernel(pt._fixed_point_gaussian(5, 1.2), pt._BLUR_FRACTION_BITS)]
    for sigma in (2.0, 0.6, 5.0):
        kernels += [kernel for subtract in (False, True)
                    for kernel, _ in fk.float_pass_kernels(pt._float_gaussian(sigma), subtract)]
    for kernel in kernels:
        parsed = _CodeParser(kernel.source)
        assert parsed.function_name == kernel.name and len(kernel.params) <= fk.MAX_INPUTS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host (CI: CPU only)")
def test_fused_kernels_on_cuda_equal_the_torch_path(photo, generated):
    device = torch.device("cuda")
    assert pt.fused_kernels.launcher(device) is not None, "the fused kernels did not compile on this GPU host"
    images = [torch.from_numpy(image).to(device) for image in (photo, generated)]
    fused_marks = pt.embed_watermarks_torch(images, [1, 2])
    expected = _torch_path(pt.embed_watermarks_torch, images, [1, 2])
    for got, want in zip(fused_marks, expected):
        assert torch.equal(got, want)


@needs_compiler
def test_fused_kernels_self_check_passes_and_catches_swapped_outputs(monkeypatch, capsys):
    """The self-check a GPU host runs before using the kernels (here with the host-compiled source): it passes, it
    fails on a mark kernel whose outputs come back swapped, and a failing check leaves the torch path, said once."""
    fk = pt.fused_kernels
    fk.self_check(torch.device("cpu"), kernel_emulator.launch)
    right = fk.mark_kernel()
    swapped = dataclasses.replace(right, name="facefuse_mark_swapped", outputs=("green_out", "red_out", "blue_out"))
    monkeypatch.setattr(fk, "mark_kernel", lambda: swapped)
    with pytest.raises(RuntimeError, match="out of order"):
        fk.self_check(torch.device("cpu"), kernel_emulator.launch)
    monkeypatch.setattr(fk, "self_check", lambda device: fk.jiterator_launch(right, []))
    assert fk._cuda_launcher.__wrapped__(torch.device("cuda", 0)) is None
    assert "fused CUDA kernels unavailable" in capsys.readouterr().err


@needs_compiler
def test_fused_finish_of_a_batch_gives_the_torch_paths_bytes(fused):
    """The whole postprocess of a batch (paste, visible label, watermark, encode) with the fused kernels on gives
    byte for byte the files the torch path gives: PNG, JPEG, a random and a chosen watermark id."""
    rows = pt.benchmark_rows(3, torch.device("cpu"), 640, 360)
    rows[0].options = FusionOptions(format="png", visible_label=True, watermark_id=WID_HEX)
    rows[1].options = FusionOptions(format="jpeg", quality=90, watermark_id="00000000000000ff")
    rows[2].options = FusionOptions(format="png", watermark_id="0000000000000007")
    fused_files = [result[0] for result in pt.finish_torch_batch(rows)]
    torch_files = [result[0] for result in _torch_path(pt.finish_torch_batch, rows)]
    assert fused_files == torch_files and len(set(fused_files)) == 3

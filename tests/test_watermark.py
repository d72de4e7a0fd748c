"""Invisible watermark v2: exact round trips, survival of the specified attacks (one representative setting each),
error correction, no false positives, quality, re-marking and size edges. ``build/watermark_robustness.py`` has
the full table; these are the fast checks (no timing asserts)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from build.watermark_robustness import brightness as _brightness
from build.watermark_robustness import crop as _crop
from build.watermark_robustness import jpeg as _jpeg
from build.watermark_robustness import resize as _resize
from facefuse import watermark as wm
from facefuse.imaging import decode_image, encode_image
from facefuse.samples import sample_image_path
from facefuse.watermark import PAYLOAD_BITS, WatermarkReading, embed_watermark, extract_watermark, parse_watermark_id

WID = 0x0123456789ABCDEF
WID_HEX = "0123456789abcdef"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return decode_image(sample_image_path("t1.jpg").read_bytes())  # 1280x886


@pytest.fixture(scope="module")
def small_photo() -> np.ndarray:
    return decode_image(sample_image_path("Tom_Hanks_54745.png").read_bytes())  # 112x112


@pytest.fixture(scope="module")
def marked(photo) -> np.ndarray:
    return embed_watermark(photo, WID)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _assert_reads(rgb: np.ndarray, expected: int = WID, min_bit_accuracy: float = 0.99) -> WatermarkReading:
    detail = wm._extract(rgb)
    assert detail.reading.present, detail
    assert detail.reading.watermark_id == wm.format_watermark_id(expected)
    # Raw channel bits, before the Viterbi decoder corrects anything.
    raw_accuracy = np.mean((detail.soft < 0) == wm._encode_bits(expected).astype(bool))
    assert raw_accuracy >= min_bit_accuracy, raw_accuracy
    return detail.reading


def test_round_trip_exact(photo, marked):
    reading = _assert_reads(marked, min_bit_accuracy=1.0)
    assert reading.confidence > 0.9
    assert marked.shape == photo.shape and marked.dtype == np.uint8


def test_input_is_not_modified(photo):
    before = photo.copy()
    embed_watermark(photo, WID)
    assert np.array_equal(photo, before)


def test_psnr_and_luma_only(photo, marked):
    assert _psnr(photo, marked) >= 38.0
    # The same change in R, G and B (up to saturation): chroma untouched.
    delta = marked.astype(np.int16) - photo.astype(np.int16)
    unclipped = (photo > 30).all(axis=2) & (photo < 225).all(axis=2)  # the mark is < 25 levels
    assert np.array_equal(delta[..., 0][unclipped], delta[..., 1][unclipped])
    assert np.array_equal(delta[..., 0][unclipped], delta[..., 2][unclipped])


ATTACKS = {
    "jpeg q75": lambda x: _jpeg(x, 75),
    "webp q90": lambda x: decode_image(encode_image(x, "webp", 90)),
    "resize x0.5": lambda x: _resize(x, 0.5),
    "resize x2.0": lambda x: _resize(x, 2.0),
    "crop 10% off-centre": lambda x: _crop(x, 0.9, 0.9, 0.3, 0.8),
    "crop 10% one side": lambda x: _crop(x, 1.0, 0.9, 0.0, 0.0),
    "brightness +20%": lambda x: _brightness(x, gain=1.2),
    "brightness -20%": lambda x: _brightness(x, offset=-51),
    "crop 10% + jpeg q75": lambda x: _jpeg(_crop(x, 0.9, 0.9, 0.7, 0.2), 75),
    "resize x0.5 + jpeg q75": lambda x: _jpeg(_resize(x, 0.5), 75),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_survives_attack(marked, attack):
    _assert_reads(ATTACKS[attack](marked))


def test_full_hd_survives_resize_and_crop(photo):
    image = cv2.resize(photo, (1920, 1080), interpolation=cv2.INTER_CUBIC)
    marked = embed_watermark(image, WID)
    assert _psnr(image, marked) >= 38.0
    _assert_reads(_jpeg(_crop(_resize(marked, 0.75), 0.9, 1.0, 0.5, 0.0), 75))


def test_error_correction_and_crc():
    code = wm._encode_bits(WID)
    assert code.shape == (wm.CODE_BITS,)
    soft = 1.0 - 2.0 * code
    rng = np.random.default_rng(3)
    flipped = soft.copy()
    flipped[rng.choice(wm.CODE_BITS, 10, replace=False)] *= -1  # 10 scattered raw-bit errors: corrected
    assert wm._decode_id(flipped) == WID
    # Soft decoding through Gaussian noise that flips ~7% of the raw bits (Eb/N0 ~3.5 dB).
    assert all(wm._decode_id(1.5 * soft + rng.normal(0, 1, wm.CODE_BITS)) == WID for _ in range(20))
    # Random soft values decode to *some* path; the CRC-24 rejects it.
    assert all(wm._decode_id(rng.normal(0, 1, wm.CODE_BITS)) is None for _ in range(50))


def test_unmarked_images_read_absent(photo, small_photo):
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:480, :640]
    checker = (((yy // 50) + (xx // 50)) % 2 * 255).astype(np.uint8)
    tile = cv2.GaussianBlur(rng.normal(0, 40, (99, 99)), (0, 0), 1.0)
    periodic = np.clip(128 + np.tile(tile, (6, 8))[:480, :640], 0, 255).astype(np.uint8)
    unmarked = [
        photo,
        small_photo,
        _jpeg(photo, 75),
        _resize(photo, 0.5),
        rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        np.full((480, 640, 3), 128, dtype=np.uint8),
        np.zeros((64, 64, 3), dtype=np.uint8),
        np.full((64, 64, 3), 255, dtype=np.uint8),
        np.repeat((xx // 3).astype(np.uint8)[..., None], 3, axis=2),
        np.repeat(checker[..., None], 3, axis=2),
        np.repeat(periodic[..., None], 3, axis=2),
    ]
    for image in unmarked:
        reading = extract_watermark(image)
        assert not reading.present and reading.watermark_id is None, image.shape
        assert reading.confidence == 0.0


def test_many_random_crops_never_false_positive(photo):
    rng = np.random.default_rng(11)
    for _ in range(40):
        height, width = (int(v) for v in rng.integers(48, 400, 2))
        top, left = int(rng.integers(0, photo.shape[0] - height)), int(rng.integers(0, photo.shape[1] - width))
        assert not extract_watermark(np.ascontiguousarray(photo[top:top + height, left:left + width])).present


def test_small_face_crop_round_trip(small_photo):
    marked = embed_watermark(small_photo, WID)
    assert _psnr(small_photo, marked) >= 38.0
    for image in (marked, _jpeg(marked, 90)):
        reading = extract_watermark(image)
        assert reading.present and reading.watermark_id == WID_HEX


def test_small_images_never_crash(photo):
    for shape in [(64, 64, 3), (48, 48, 3), (47, 47, 3), (32, 32, 3), (8, 8, 3), (7, 300, 3), (300, 7, 3),
                  (1, 1, 3), (0, 0, 3), (0, 64, 3)]:
        image = np.ascontiguousarray(np.resize(photo, shape))
        out = embed_watermark(image, WID)
        assert out.shape == image.shape and out.dtype == np.uint8
        reading = extract_watermark(out)
        if min(shape[:2]) >= 32:  # decode_image's own lower limit
            extract_watermark(_jpeg(out, 75))
        if min(shape[:2]) < 48:  # too small to carry the mark: returned unchanged, read as absent
            assert np.array_equal(out, image)
            assert reading == WatermarkReading(False, None, 0.0)
    tiny = np.ascontiguousarray(photo[300:364, 600:664])  # 64x64: still carries it, unattacked
    assert extract_watermark(embed_watermark(tiny, WID)).watermark_id == WID_HEX


def test_different_ids_and_remarking(photo):
    crop = np.ascontiguousarray(photo[:300, :400])
    ids = [0, 1, 0xFFFFFFFFFFFFFFFF, 0x8000000000000000, WID]
    readings = [extract_watermark(embed_watermark(crop, value)).watermark_id for value in ids]
    assert readings == [f"{value:016x}" for value in ids]
    # Re-marking (the service's output used as the next target) replaces the earlier id instead of garbling it,
    # and does not stack two patterns.
    first = embed_watermark(photo, WID)
    again = embed_watermark(_jpeg(first, 92), WID ^ 0xFFFFFFFFFFFFFFFF)  # every payload bit different
    _assert_reads(again, WID ^ 0xFFFFFFFFFFFFFFFF)
    assert _psnr(photo, again) >= 37.0


def test_strength_trades_psnr_for_robustness(photo, marked):
    gentle = embed_watermark(photo, WID, strength=0.7)
    assert _psnr(photo, gentle) > _psnr(photo, marked) + 2.0
    _assert_reads(_jpeg(gentle, 90))


def test_bad_arguments():
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError):
        embed_watermark(image, 1 << PAYLOAD_BITS)
    with pytest.raises(ValueError):
        embed_watermark(image, -1)
    with pytest.raises(ValueError):
        embed_watermark(image, 1, strength=0)
    with pytest.raises(ValueError):
        embed_watermark(image, 1, strength=1.5)
    with pytest.raises(ValueError):
        embed_watermark(np.zeros((64, 64), np.uint8), 1)
    with pytest.raises(ValueError):
        extract_watermark(np.zeros((64, 64, 3), np.float32))


@pytest.mark.parametrize("text,value", [("0", 0), ("abc", 0xABC), ("0xABC", 0xABC), ("0X00ff", 0xFF),
                                        ("ffffffffffffffff", (1 << 64) - 1), (" 12 ", 0x12)])
def test_parse_watermark_id(text, value):
    assert parse_watermark_id(text) == value


@pytest.mark.parametrize("text", ["", "0x", "xyz", "12 34", "1234567890abcdef0", "-1", "+1", "0x-1", "１２"])
def test_parse_watermark_id_rejects(text):
    with pytest.raises(ValueError):
        parse_watermark_id(text)


@pytest.mark.parametrize("size", [33, 66, 99, 132, 133])
def test_tile_rendering_is_the_zero_padded_spectrum(size):
    """_render's separable form equals the definition: the chips' spectrum zero-padded to size x size and inverse
    transformed (then unit RMS), to float32 rounding."""
    chips = np.random.default_rng(size).choice([-1.0, 1.0], size=(wm._N, wm._N))
    index = wm._BAND % size
    spectrum = np.zeros((size, size), dtype=complex)
    spectrum[np.ix_(index, index)] = np.fft.fft2(chips - chips.mean())
    expected = np.real(np.fft.ifft2(spectrum))
    expected /= np.sqrt(np.mean(expected**2))
    rendered = wm._render(chips, size)
    assert rendered.dtype == np.float32 and rendered.shape == (size, size)
    assert np.abs(rendered - expected).max() < 1e-5

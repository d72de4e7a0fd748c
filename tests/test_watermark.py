"""Invisible watermark: exact round trips, survival of lossy re-encodes, no false positives, quality and size edges."""

from __future__ import annotations

import numpy as np
import pytest

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


def _assert_reads(rgb: np.ndarray, expected_hex: str = WID_HEX) -> WatermarkReading:
    reading = extract_watermark(rgb)
    assert reading.present, reading
    assert reading.watermark_id == expected_hex
    return reading


def test_round_trip_exact(photo, marked):
    reading = _assert_reads(marked)
    assert reading.confidence > 0.9
    assert marked.shape == photo.shape and marked.dtype == np.uint8


def test_input_is_not_modified(photo):
    before = photo.copy()
    embed_watermark(photo, WID)
    assert np.array_equal(photo, before)


def test_psnr_at_least_40db(photo, marked, small_photo):
    assert _psnr(photo, marked) >= 40.0
    assert _psnr(small_photo, embed_watermark(small_photo, WID)) >= 40.0


@pytest.mark.parametrize("fmt,quality", [("jpeg", 90), ("jpeg", 75), ("png", 92), ("webp", 90)])
def test_survives_reencoding(marked, fmt, quality):
    _assert_reads(decode_image(encode_image(marked, fmt, quality)))


@pytest.mark.parametrize("fmt,quality", [("jpeg", 90), ("jpeg", 75), ("webp", 90)])
def test_small_face_crop_survives_reencoding(small_photo, fmt, quality):
    _assert_reads(decode_image(encode_image(embed_watermark(small_photo, WID), fmt, quality)))


def test_unmarked_images_read_absent(photo, small_photo):
    rng = np.random.default_rng(7)
    unmarked = [
        photo,
        small_photo,
        decode_image(encode_image(photo, "jpeg", 75)),
        rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        np.full((480, 640, 3), 128, dtype=np.uint8),
        np.zeros((64, 64, 3), dtype=np.uint8),
        np.full((64, 64, 3), 255, dtype=np.uint8),
        np.broadcast_to(np.arange(640, dtype=np.uint8)[None, :, None] // 3, (480, 640, 3)).copy(),
    ]
    for image in unmarked:
        reading = extract_watermark(image)
        assert not reading.present and reading.watermark_id is None, image.shape
        assert 0.0 <= reading.confidence < 0.5


def test_many_random_crops_never_false_positive(photo):
    rng = np.random.default_rng(11)
    for _ in range(40):
        height, width = (int(v) for v in rng.integers(48, 300, 2))
        top, left = int(rng.integers(0, photo.shape[0] - height)), int(rng.integers(0, photo.shape[1] - width))
        assert not extract_watermark(np.ascontiguousarray(photo[top:top + height, left:left + width])).present


def test_odd_size_and_ragged_border_untouched(photo):
    image = np.ascontiguousarray(photo[50:827, 100:1101])  # 1001 wide, 777 high
    assert image.shape[:2] == (777, 1001)
    out = embed_watermark(image, WID)
    assert out.shape == image.shape
    assert np.array_equal(out[776:], image[776:]) and np.array_equal(out[:, 1000:], image[:, 1000:])
    assert not np.array_equal(out, image)
    _assert_reads(out)
    _assert_reads(decode_image(encode_image(out, "jpeg", 90)))


def test_tiny_images_never_crash(photo):
    image = np.ascontiguousarray(photo[300:364, 600:664])  # 64x64
    reading = extract_watermark(embed_watermark(image, WID))
    assert reading.present and reading.watermark_id == WID_HEX
    for shape in [(32, 32, 3), (8, 8, 3), (7, 300, 3), (1, 1, 3), (0, 0, 3)]:
        tiny = np.full(shape, 100, dtype=np.uint8)
        out = embed_watermark(tiny, WID)
        assert out.shape == tiny.shape  # too small to carry the mark: returned unchanged
        assert extract_watermark(out) == WatermarkReading(False, None, 0.0)


def test_different_ids_give_different_readings(photo):
    crop = np.ascontiguousarray(photo[:256, :384])
    ids = [0, 1, 2, 0xFFFFFFFFFFFFFFFF, 0x8000000000000000, WID]
    readings = [extract_watermark(embed_watermark(crop, value)).watermark_id for value in ids]
    assert readings == [f"{value:016x}" for value in ids]
    # Re-marking overwrites the previous id.
    assert extract_watermark(embed_watermark(embed_watermark(crop, 5), 6)).watermark_id == f"{6:016x}"


def test_strength_trades_psnr_for_robustness(photo):
    gentle = embed_watermark(photo, WID, strength=0.7)
    assert _psnr(photo, gentle) > _psnr(photo, embed_watermark(photo, WID))
    _assert_reads(decode_image(encode_image(gentle, "jpeg", 90)))


def test_bad_arguments():
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError):
        embed_watermark(image, 1 << PAYLOAD_BITS)
    with pytest.raises(ValueError):
        embed_watermark(image, -1)
    with pytest.raises(ValueError):
        embed_watermark(image, 1, strength=0)
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


def test_full_hd_round_trip(photo):
    image = np.ascontiguousarray(np.resize(photo, (1080, 1920, 3)))
    assert extract_watermark(embed_watermark(image, WID)).watermark_id == WID_HEX

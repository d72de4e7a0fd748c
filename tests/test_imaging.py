"""decode_image / encode_image / image_size: orientation, modes, limits before decoding, XMP in every output."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from facefuse.errors import IMAGE_TOO_LARGE, IMAGE_TOO_SMALL, INVALID_IMAGE, FusionError
from facefuse.imaging import OUTPUT_FORMATS, ImageLimits, decode_image, encode_image, image_size
from facefuse.provenance import DIGITAL_SOURCE_TYPE, build_xmp, read_provenance
from facefuse.samples import sample_image_path


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _expected_upright() -> np.ndarray:
    """64 wide x 40 high, asymmetric under every flip/rotation, smooth enough for JPEG."""
    y, x = np.mgrid[0:40, 0:64]
    rgb = np.stack([x * 4, y * 6, np.where((x < 16) & (y < 16), 255, 0)], axis=-1)
    return rgb.astype(np.uint8)


# EXIF orientation -> stored pixels whose upright display is ``e`` (numpy only, independent of Pillow's table).
_STORED = {
    1: lambda e: e,
    2: lambda e: e[:, ::-1],  # mirrored horizontally
    3: lambda e: e[::-1, ::-1],  # rotated 180
    4: lambda e: e[::-1],  # mirrored vertically
    5: lambda e: e.transpose(1, 0, 2),  # transposed
    6: lambda e: np.rot90(e, 1),  # display = stored rotated 90 clockwise
    7: lambda e: e.transpose(1, 0, 2)[::-1, ::-1],  # transverse
    8: lambda e: np.rot90(e, -1),  # display = stored rotated 90 counter-clockwise
}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation, fmt):
    expected = _expected_upright()
    stored = np.ascontiguousarray(_STORED[orientation](expected))
    exif = Image.Exif()
    exif[0x0112] = orientation
    params = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    data = _save(Image.fromarray(stored), fmt, exif=exif.tobytes(), **params)
    decoded = decode_image(data)
    assert decoded.shape == expected.shape
    assert decoded.dtype == np.uint8 and decoded.flags.c_contiguous
    diff = np.abs(decoded.astype(int) - expected)
    if fmt == "JPEG":
        assert diff.mean() < 3
    else:
        assert diff.max() == 0
    assert image_size(data) == (64, 40)


def test_sample_photos_decode():
    for name, size in (("t1.jpg", (1280, 886)), ("Tom_Hanks_54745.png", (112, 112))):
        data = sample_image_path(name).read_bytes()
        rgb = decode_image(data, role="source")
        assert rgb.shape == (size[1], size[0], 3) and rgb.dtype == np.uint8
        assert rgb.flags.c_contiguous and rgb.flags.writeable
        assert image_size(data) == size


def _truncated(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    data = _save(Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)), fmt)
    return data[: len(data) // 2]


def _gif() -> bytes:
    return _save(Image.new("RGB", (64, 64), (10, 20, 30)), "GIF")


def _tiff() -> bytes:
    return _save(Image.new("RGB", (64, 64), (10, 20, 30)), "TIFF")


@pytest.mark.parametrize("make", [lambda: b"", lambda: b"hello, this is not an image" * 10, lambda: _truncated("JPEG"),
                                  lambda: _truncated("PNG"), lambda: _truncated("WEBP"), _gif, _tiff,
                                  lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, lambda: b"\xff\xd8\xff\xe0garbage"],
                         ids=["empty", "garbage", "truncated-jpeg", "truncated-png", "truncated-webp", "gif", "tiff",
                              "png-signature-only", "jpeg-magic-only"])
def test_bad_bytes_are_invalid_image(make):
    with pytest.raises(FusionError) as caught:
        decode_image(make(), role="source")
    assert caught.value.code == INVALID_IMAGE
    assert str(caught.value).startswith("INVALID_IMAGE: the source image")


def test_unsupported_format_names_the_supported_ones():
    with pytest.raises(FusionError) as caught:
        decode_image(_gif(), role="target")
    message = str(caught.value)
    assert "GIF" in message and "JPEG" in message and "PNG" in message and "WebP" in message and "BMP" in message


def test_truncated_jpeg_says_truncated():
    with pytest.raises(FusionError) as caught:
        decode_image(_truncated("JPEG"), role="source")
    assert "truncated" in str(caught.value)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height RGB; its IDAT holds almost nothing."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def _webp_vp8x_header(width: int, height: int) -> bytes:
    body = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


@pytest.mark.parametrize("data", [_png_header_only(50_000, 50_000), _png_header_only(20_000, 20_000),
                                  _png_header_only(12_001, 40), _webp_vp8x_header(16_384, 16_384)],
                         ids=["png-50000", "png-20000", "png-wide", "webp-16384"])
def test_huge_declared_size_is_too_large_without_decoding(data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape either
        with pytest.raises(FusionError) as caught:
            decode_image(data, role="target")
    assert caught.value.code == IMAGE_TOO_LARGE
    assert "the target image" in str(caught.value)


def test_too_large_message_gives_size_and_limit():
    with pytest.raises(FusionError) as caught:
        decode_image(_png_header_only(50_000, 50_000))
    assert "50000x50000" in caught.value.message and "40,000,000" in caught.value.message


def test_byte_limit():
    data = _save(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(FusionError) as caught:
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))
    assert caught.value.code == IMAGE_TOO_LARGE


def test_pixel_limit_is_configurable():
    data = _save(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(FusionError) as caught:
        decode_image(data, ImageLimits(max_pixels=9_999))
    assert caught.value.code == IMAGE_TOO_LARGE


@pytest.mark.parametrize("size", [(16, 16), (31, 200), (200, 31)])
def test_too_small(size):
    with pytest.raises(FusionError) as caught:
        decode_image(_save(Image.new("RGB", size), "PNG"), role="source")
    assert caught.value.code == IMAGE_TOO_SMALL
    assert "32" in caught.value.message


def _rgba_half_transparent() -> Image.Image:
    rgba = np.zeros((40, 48, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 24:, 3] = 255  # right half opaque red, left half fully transparent
    return Image.fromarray(rgba, "RGBA")


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (48, 40), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.paste(1, (24, 0, 48, 40))
    return _save(image, "PNG", transparency=0)


def _cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (48, 40), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK


def _animated_webp() -> bytes:
    frames = [Image.new("RGB", (48, 40), color) for color in ((250, 0, 0), (0, 250, 0))]
    return _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=100)


@pytest.mark.parametrize("make,check", [
    (lambda: _save(Image.new("L", (48, 40), 77), "PNG"), lambda a: np.all(a == 77)),
    (lambda: _save(Image.new("L", (48, 40), 77), "JPEG"), lambda a: np.all(np.abs(a.astype(int) - 77) <= 1)),
    (lambda: _save(Image.new("LA", (48, 40), (0, 0)), "PNG"), lambda a: np.all(a == 255)),
    (lambda: _save(_rgba_half_transparent(), "PNG"),
     lambda a: np.all(a[:, :24] == 255) and np.all(a[:, 24:] == (200, 0, 0))),
    (lambda: _save(_rgba_half_transparent(), "WEBP", lossless=True),
     lambda a: np.all(a[:, :24] == 255) and np.all(a[:, 24:] == (200, 0, 0))),
    (_palette_with_transparency, lambda a: np.all(a[:, :24] == 255) and np.all(a[:, 24:] == (10, 200, 30))),
    (lambda: _save(Image.new("RGB", (48, 40), (1, 2, 3)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
     lambda a: np.all(a == (1, 2, 3))),
    (_cmyk_jpeg, lambda a: np.all(np.abs(a.astype(int) - (255, 0, 0)) <= 3)),
    (lambda: _save(Image.fromarray(np.full((40, 48), 0x8000, dtype=np.uint16)), "PNG"), lambda a: np.all(a == 128)),
    (lambda: _save(Image.fromarray(np.full((40, 48), 0xFFFF, dtype=np.uint16)), "PNG"), lambda a: np.all(a == 255)),
    (lambda: _save(Image.new("RGB", (48, 40), (9, 99, 199)), "BMP"), lambda a: np.all(a == (9, 99, 199))),
    (lambda: _save(Image.new("1", (48, 40), 1), "BMP"), lambda a: np.all(a == 255)),
    (lambda: _save(Image.new("RGB", (48, 40), (9, 99, 199)), "WEBP", lossless=True),
     lambda a: np.all(a == (9, 99, 199))),
    (lambda: _save(Image.new("RGB", (48, 40), (9, 99, 199)), "WEBP", quality=90),
     lambda a: np.all(np.abs(a.astype(int) - (9, 99, 199)) <= 4)),
    (_animated_webp, lambda a: np.all(a == (250, 0, 0))),
], ids=["gray-png", "gray-jpeg", "la-transparent", "rgba-png", "rgba-webp", "palette-trns", "palette", "cmyk-jpeg",
        "png16-mid", "png16-max", "bmp", "bmp-1bit", "webp-lossless", "webp-lossy", "webp-animated"])
def test_modes_decode_to_rgb(make, check):
    rgb = decode_image(make())
    assert rgb.shape == (40, 48, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    assert check(rgb)


def test_decoded_array_is_writable_and_independent():
    data = _save(Image.new("RGB", (48, 40), (5, 6, 7)), "PNG")
    first = decode_image(data)
    first[:] = 0
    assert np.all(decode_image(data) == (5, 6, 7))


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_encode_carries_xmp(fmt):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    xmp = build_xmp("00000000deadbeef", "facefuse-test 1.0")
    data = encode_image(rgb, fmt, quality=90, xmp=xmp, text={"Software": "facefuse-test"})
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
        stored = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
        if isinstance(stored, str):
            stored = stored.encode("utf-8")
        assert stored is not None and b"compositeWithTrainedAlgorithmicMedia" in stored
        if fmt == "png":
            assert image.info["Software"] == "facefuse-test"
    provenance = read_provenance(data)
    assert provenance == {"digital_source_type": DIGITAL_SOURCE_TYPE, "watermark_id": "00000000deadbeef",
                          "creator_tool": "facefuse-test 1.0"}
    decoded = decode_image(data)
    assert decoded.shape == rgb.shape
    if fmt == "png":
        assert np.array_equal(decoded, rgb)


def test_jpeg_xmp_is_an_app1_segment_after_soi():
    data = encode_image(np.zeros((40, 48, 3), np.uint8), "jpeg", xmp=build_xmp("1", "t"))
    assert data[:2] == b"\xff\xd8"
    position = data.find(b"\xff\xe1")
    assert 0 < position < 64
    assert data[position + 4: position + 4 + 29] == b"http://ns.adobe.com/xap/1.0/\x00"


def test_encode_without_metadata_has_no_provenance():
    for fmt in OUTPUT_FORMATS:
        assert read_provenance(encode_image(np.zeros((40, 48, 3), np.uint8), fmt)) is None


def test_encode_rejects_bad_arguments():
    with pytest.raises(ValueError):
        encode_image(np.zeros((40, 48, 3), np.uint8), "gif")
    with pytest.raises(ValueError):
        encode_image(np.zeros((40, 48), np.uint8), "png")
    with pytest.raises(ValueError):
        encode_image(np.zeros((40, 48, 3), np.float32), "png")


def test_compressed_png_itxt_xmp_is_found():
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", build_xmp("abc", "tool").decode("utf-8"), zip=True)
    data = _save(Image.new("RGB", (48, 40)), "PNG", pnginfo=info)
    assert read_provenance(data)["digital_source_type"] == DIGITAL_SOURCE_TYPE

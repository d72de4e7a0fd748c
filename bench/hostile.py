"""A catalogue of malformed and hostile inputs for the `face_fusion` ensemble, each with the outcome it must get.

Shared by tests/test_hostile_inputs.py (every case over gRPC and HTTP against the live server) and bench/soak.py
(a rotating subset mixed into valid traffic). Everything is built in code from the two shipped sample photos, so
the catalogue needs no files; `build_catalogue()` is cached because a few cases are megabytes.

`expect` is a stable error code (facefuse.errors) or OK; `check_result` says what is wrong with an OK answer.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from facefuse import errors
from facefuse.imaging import ImageLimits, decode_image
from facefuse.samples import sample_image_path

OK = "OK"
REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


@dataclass(frozen=True, eq=False)
class HostileCase:
    name: str
    what: str  # one line for the catalogue table
    source: bytes
    target: bytes
    expect: str  # an error code, or OK
    face_degree: float = 100.0
    profile_degree: float = 100.0
    options: bytes = b"{}"
    expected_size: tuple[int, int] | None = None  # OK: (width, height) of FUSED_IMAGE, the upright target's size
    upright_target: np.ndarray | None = None  # OK: the result must look like this away from the fused face
    forbidden: bytes = b""  # OK: a payload smuggled in the input that must not come out
    heavy: bool = False  # megabytes or seconds: left out of the soak's rotation


# --- encoders and the two base photos -----------------------------------------------------------------------------

def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _png(rgb: np.ndarray, **params: object) -> bytes:
    return _save(Image.fromarray(rgb), "PNG", **{"compress_level": 1, **params})  # level 1: quick to build


def _jpeg(rgb: np.ndarray, quality: int = 95, **params: object) -> bytes:
    return _save(Image.fromarray(rgb), "JPEG", quality=quality, **params)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def hanks() -> np.ndarray:
    """The 112x112 portrait: one face, eyes ~38 px apart; the source of every case that should succeed."""
    return decode_image(sample_image_path("Tom_Hanks_54745.png").read_bytes())


@functools.cache
def scene() -> np.ndarray:
    """A 640x380 cut of the group photo with three faces: a real, asymmetric, non-square target that is quick to
    search (the full 1280x886 photo costs seconds of detection on a small CPU)."""
    group = decode_image(sample_image_path("t1.jpg").read_bytes())
    return np.ascontiguousarray(group[120:500, 0:640])


def _canvas(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A textured colour gradient without a face."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255.0 / max(1, width), y * 255.0 / max(1, height), (x + y) * 127.0 / (width + height)], -1)
    rgb += np.random.default_rng(seed).normal(0, 4, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _with_face(width: int, height: int, face_px: int, left: int = 0, top: int = 0) -> np.ndarray:
    """A faceless canvas with the portrait shrunk to face_px x face_px pasted at (left, top)."""
    canvas = _canvas(width, height)
    small = cv2.resize(hanks(), (face_px, face_px), interpolation=cv2.INTER_AREA)
    canvas[top:top + face_px, left:left + face_px] = small
    return canvas


# --- headers that lie about the size (decompression bombs) --------------------------------------------------------

def png_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG whose IHDR declares width x height; its IDAT holds almost nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def png_zlib_bomb(width: int, height: int) -> bytes:
    """A complete, valid black PNG: ~1000:1 zlib, so a few hundred KiB inflate to width*height*3 bytes."""
    row = b"\x00" + b"\x00" * (width * 3)
    compressor = zlib.compressobj(1)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def png_text_bomb(megabytes: int = 16) -> bytes:
    """A valid small PNG plus a zTXt chunk inflating to `megabytes` MiB (Pillow caps text chunks at 1 MiB)."""
    plain = _png(hanks())
    text = b"Comment\x00\x00" + zlib.compress(b"A" * (megabytes << 20), 1)
    iend = plain.rindex(b"IEND") - 4
    return plain[:iend] + _chunk(b"zTXt", text) + plain[iend:]


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 segment is patched to declare width x height."""
    data = bytearray(_jpeg(_canvas(64, 64), quality=80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_vp8x_header(width: int, height: int) -> bytes:
    """An extended-format WebP header (24-bit canvas size) with no image data."""
    body = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_vp8l_header(width: int, height: int) -> bytes:
    """A lossless WebP whose 14-bit size fields declare width x height, with a few bytes of (bogus) data."""
    bits = (width - 1) | ((height - 1) << 14)
    body = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 16
    chunk = b"VP8L" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def bmp_header(width: int, height: int) -> bytes:
    """A 24-bit BMP header declaring width x height, followed by 64 bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\x00" * 64
    header = b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return header + info + pixels


# --- EXIF orientation ---------------------------------------------------------------------------------------------

# Orientation -> stored pixels whose upright display is `e` (EXIF 2.3 table in numpy, independent of Pillow's).
STORED_FOR_ORIENTATION: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda e: e,
    2: lambda e: e[:, ::-1],
    3: lambda e: e[::-1, ::-1],
    4: lambda e: e[::-1],
    5: lambda e: e.transpose(1, 0, 2),
    6: lambda e: np.rot90(e, 1),
    7: lambda e: e.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda e: np.rot90(e, -1),
}


def oriented_jpeg(upright: np.ndarray, orientation: int) -> bytes:
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](upright))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(stored, quality=95, exif=exif.tobytes())


def _jpeg_with_segment(jpeg: bytes, marker: bytes, payload: bytes) -> bytes:
    """Insert one APPn/COM segment right after SOI."""
    return jpeg[:2] + marker + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


# --- polyglots, animations, odd modes -------------------------------------------------------------------------------

ZIP_PAYLOAD = (b"PK\x03\x04\x14\x00\x00\x00\x00\x00" + b"\x00" * 16 + b"\x09\x00\x00\x00payload.txt"
               + b"smuggled zip payload" + b"PK\x05\x06" + b"\x00" * 18)
HTML_PAYLOAD = b"<html><body><script>alert('polyglot')</script></body></html>"


def animated_gif() -> bytes:
    frames = [Image.fromarray(hanks()).convert("P"), Image.fromarray(_canvas(112, 112)).convert("P")]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def animated(fmt: str) -> bytes:
    """Two frames: the portrait first, a faceless canvas second (a decoder on the wrong frame finds no face)."""
    frames = [Image.fromarray(hanks()), Image.fromarray(_canvas(112, 112))]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def png_16bit_rgb() -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(hanks(), cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    assert ok
    return data.tobytes()


def png_16bit_gray() -> bytes:
    gray = cv2.cvtColor(hanks(), cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
    return _save(Image.fromarray(gray), "PNG")  # Pillow writes I;16 as a 16-bit greyscale PNG


def png_alpha(alpha: int | None) -> bytes:
    """The portrait with an alpha channel: a radial fade (None), or one constant value everywhere."""
    if alpha is None:
        y, x = np.mgrid[0:112, 0:112]
        channel = np.clip(255 - (np.hypot(x - 56, y - 56) - 50) * 20, 0, 255).astype(np.uint8)  # opaque face
    else:
        channel = np.full((112, 112), alpha, np.uint8)
    return _png(np.dstack([hanks(), channel]))


def tiled_faces(columns: int, rows: int) -> np.ndarray:
    return np.ascontiguousarray(np.tile(hanks(), (rows, columns, 1)))


def padded_jpeg(size: int) -> bytes:
    """A valid JPEG of exactly `size` bytes: the portrait, then zeros after its EOI marker (decoders ignore them)."""
    base = _jpeg(hanks())
    if size < len(base):
        raise ValueError(f"cannot pad a {len(base)}-byte JPEG down to {size} bytes")
    return base + b"\x00" * (size - len(base))


def preprocess_limits(repository: Path = REPOSITORY) -> ImageLimits:
    """The limits a server on `repository` enforces: ImageLimits' defaults overridden by preprocess's parameters."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((repository / "preprocess" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    defaults = ImageLimits()
    return ImageLimits(max_bytes=int(parameters.get("max_image_bytes", defaults.max_bytes)),
                       max_pixels=int(parameters.get("max_image_pixels", defaults.max_pixels)),
                       max_side=int(parameters.get("max_image_side", defaults.max_side)),
                       min_side=int(parameters.get("min_image_side", defaults.min_side)))


# --- the catalogue -------------------------------------------------------------------------------------------------

@functools.cache
def build_catalogue(limits: ImageLimits | None = None) -> tuple[HostileCase, ...]:
    limits = limits or preprocess_limits()
    source, target = _png(hanks()), _jpeg(scene())
    scene_size = (scene().shape[1], scene().shape[0])
    whole = {"expected_size": scene_size, "upright_target": scene()}
    jpeg_src = _jpeg(hanks())
    cases: list[HostileCase] = []

    def add(name: str, what: str, expect: str, src: bytes = source, tgt: bytes = target, **extra: object) -> None:
        if expect == OK:
            extra = {**whole, **extra}
        cases.append(HostileCase(name, what, src, tgt, expect, **extra))  # type: ignore[arg-type]

    # Empty, truncated, wrong magic.
    add("empty_source", "zero-length SOURCE_IMAGE", errors.INVALID_IMAGE, src=b"")
    add("empty_target", "zero-length TARGET_IMAGE", errors.INVALID_IMAGE, tgt=b"")
    add("truncated_jpeg", "first half of a JPEG", errors.INVALID_IMAGE, tgt=target[: len(target) // 2])
    add("truncated_png", "first half of a PNG", errors.INVALID_IMAGE, src=source[: len(source) // 2])
    add("jpeg_headers_only", "JPEG cut after 300 bytes (markers, no scan)", errors.INVALID_IMAGE, src=jpeg_src[:300])
    add("png_signature_only", "the 8-byte PNG signature alone", errors.INVALID_IMAGE, src=source[:8])
    add("png_bad_crc", "PNG whose IDAT is corrupted (CRC and zlib)", errors.INVALID_IMAGE,
        src=source[:60] + bytes(b ^ 0x5A for b in source[60:200]) + source[200:])
    add("png_magic_on_jpeg", "JPEG body behind a PNG signature", errors.INVALID_IMAGE,
        src=b"\x89PNG\r\n\x1a\n" + jpeg_src[8:])
    add("jpeg_magic_on_png", "PNG body behind a JPEG SOI", errors.INVALID_IMAGE, src=b"\xff\xd8\xff" + source[3:])
    add("random_bytes", "4 KiB of random bytes", errors.INVALID_IMAGE,
        src=np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    add("html_text", "an HTML page", errors.INVALID_IMAGE, tgt=HTML_PAYLOAD)
    add("tiff", "a TIFF (recognised, unsupported)", errors.INVALID_IMAGE, src=_save(Image.fromarray(hanks()), "TIFF"))
    add("pdf_magic", "a PDF header", errors.INVALID_IMAGE, src=b"%PDF-1.7\n" + b"0" * 200)
    add("svg", "an SVG document", errors.INVALID_IMAGE,
        src=b'<svg xmlns="http://www.w3.org/2000/svg" width="50000" height="50000"/>')
    add("jpeg_zero_size", "JPEG whose SOF declares 0x0", errors.INVALID_IMAGE, src=jpeg_with_size(0, 0))
    # Polyglots: appended payloads are ignored by the decoder and never reach the output (it is re-encoded);
    # prepended ones hide the magic and are refused.
    add("jpeg_plus_zip", "JPEG with a ZIP archive appended (polyglot)", OK, src=jpeg_src + ZIP_PAYLOAD,
        tgt=_jpeg(scene()) + ZIP_PAYLOAD, forbidden=b"smuggled zip payload")
    add("png_plus_html", "PNG with HTML appended after IEND", OK, tgt=_png(scene()) + HTML_PAYLOAD,
        forbidden=b"<script>")
    add("jpeg_html_comment", "JPEG carrying HTML in a COM segment", OK,
        tgt=_jpeg_with_segment(target, b"\xff\xfe", HTML_PAYLOAD), forbidden=b"<script>")
    add("html_then_jpeg", "HTML prepended to a JPEG", errors.INVALID_IMAGE, src=HTML_PAYLOAD + jpeg_src)
    add("zip_then_jpeg", "ZIP prepended to a JPEG", errors.INVALID_IMAGE, src=ZIP_PAYLOAD + jpeg_src)
    # Decompression bombs: the header's size is refused before a pixel is decoded.
    add("png_bomb_50k", "PNG header declaring 50000x50000", errors.IMAGE_TOO_LARGE, tgt=png_header(50_000, 50_000))
    add("jpeg_bomb_50k", "JPEG SOF declaring 50000x50000", errors.IMAGE_TOO_LARGE, tgt=jpeg_with_size(50_000, 50_000))
    add("webp_bomb_50k", "WebP VP8X declaring 50000x50000", errors.IMAGE_TOO_LARGE,
        tgt=webp_vp8x_header(50_000, 50_000))
    add("webp_lossless_16k", "WebP VP8L declaring 16384x16384", errors.IMAGE_TOO_LARGE,
        src=webp_vp8l_header(16_384, 16_384))
    add("bmp_bomb_50k", "BMP header declaring 50000x50000", errors.IMAGE_TOO_LARGE, src=bmp_header(50_000, 50_000))
    add("png_zlib_bomb_in_limits", "valid 6000x6000 black PNG (~0.5 MB inflating to 108 MB)",
        errors.NO_FACE_IN_SOURCE, src=png_zlib_bomb(6000, 6000), heavy=True)
    # Pillow stops inflating a text chunk at 1 MiB and refuses the file: a metadata bomb is an invalid image.
    add("png_ztxt_bomb", "PNG with a zTXt chunk inflating to 16 MiB", errors.INVALID_IMAGE, src=png_text_bomb(16))
    # Pixel formats and colour modes that must all decode to RGB.
    add("png_16bit_rgb", "16-bit RGB PNG", OK, src=png_16bit_rgb())
    add("png_16bit_gray", "16-bit greyscale PNG", OK, src=png_16bit_gray())
    add("jpeg_grayscale", "greyscale JPEG", OK, src=_save(Image.fromarray(hanks()).convert("L"), "JPEG"))
    add("jpeg_cmyk", "CMYK JPEG", OK, src=_save(Image.fromarray(hanks()).convert("CMYK"), "JPEG", quality=95))
    add("png_palette", "palette (P) PNG", OK, src=_save(Image.fromarray(hanks()).convert("P"), "PNG"))
    add("png_alpha", "RGBA PNG with a radial alpha fade", OK, src=png_alpha(None))
    add("png_fully_transparent", "RGBA PNG with alpha 0 everywhere (reads as blank paper)",
        errors.NO_FACE_IN_SOURCE, src=png_alpha(0))
    add("bmp", "24-bit BMP", OK, src=_save(Image.fromarray(hanks()), "BMP"))
    # Orientation: every EXIF orientation of the target gives the upright target's size and content.
    for orientation in range(1, 9):
        add(f"exif_orientation_{orientation}", f"target JPEG stored for EXIF orientation {orientation}", OK,
            tgt=oriented_jpeg(scene(), orientation))
    add("exif_corrupt", "JPEG with a garbage EXIF segment", OK,
        tgt=_jpeg_with_segment(target, b"\xff\xe1", b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\xee" * 40))
    add("gif_animated", "animated GIF (unsupported)", errors.INVALID_IMAGE, src=animated_gif())
    add("webp_animated", "animated WebP: face in frame 1, none in frame 2 (first frame is used)", OK,
        src=animated("WEBP"))
    add("png_animated", "APNG: face in frame 1, none in frame 2 (first frame is used)", OK, src=animated("PNG"))
    # OPTIONS.
    add("options_not_utf8", "OPTIONS bytes that are not UTF-8", errors.INVALID_OPTIONS,
        options=b'{"format": "\xff\xfe"}')
    add("options_huge", "OPTIONS > 16 KiB (valid JSON)", errors.INVALID_OPTIONS,
        options=json.dumps({"watermark_id": "a" * 17_000}).encode())
    for label, raw in (("array", b"[1, 2]"), ("string", b'"jpeg"'), ("number", b"42"), ("null", b"null"),
                       ("true", b"true")):
        add(f"options_json_{label}", f"OPTIONS is JSON {label}, not an object", errors.INVALID_OPTIONS, options=raw)
    add("options_deep_nesting", "OPTIONS: 5000 nested arrays (parser recursion)", errors.INVALID_OPTIONS,
        options=b"[" * 5000 + b"]" * 5000)
    add("options_huge_integer", "OPTIONS with a 5000-digit target_face", errors.INVALID_OPTIONS,
        options=b'{"target_face": ' + b"9" * 5000 + b"}")
    add("options_bom", "OPTIONS with a UTF-8 byte-order mark", errors.INVALID_OPTIONS, options=b"\xef\xbb\xbf{}")
    add("options_nan_quality", "OPTIONS {\"quality\": NaN}", errors.INVALID_OPTIONS, options=b'{"quality": NaN}')
    add("options_unknown_key", "OPTIONS with an unknown key", errors.INVALID_OPTIONS, options=b'{"admin": true}')
    # Degrees.
    add("degree_nan", "FACE_DEGREE NaN", errors.INVALID_DEGREE, face_degree=float("nan"))
    add("degree_pos_inf", "PROFILE_DEGREE +inf", errors.INVALID_DEGREE, profile_degree=float("inf"))
    add("degree_neg_inf", "FACE_DEGREE -inf", errors.INVALID_DEGREE, face_degree=float("-inf"))
    add("degree_negative_zero", "FACE_DEGREE -0.0 (in range)", OK, face_degree=-0.0)
    # Faces.
    add("face_too_small", "a 30 px face in a 320x240 canvas (eyes ~10 px apart)", errors.FACE_TOO_SMALL,
        src=_png(_with_face(320, 240, 30, 140, 100)))
    add("no_face", "a faceless gradient", errors.NO_FACE_IN_TARGET, tgt=_png(_canvas(320, 240)))
    add("many_faces_index_out_of_range", "12 faces, target_face=12", errors.FACE_INDEX_OUT_OF_RANGE,
        tgt=_jpeg(tiled_faces(4, 3)), options=b'{"target_face": 12}')
    add("source_index_out_of_range", "one face, source_face=1", errors.FACE_INDEX_OUT_OF_RANGE,
        options=b'{"source_face": 1}')
    add("same_bytes_twice", "the same image as source and target", OK, src=target)
    # Extreme sizes and aspect ratios, against the configured limits.
    wide, tall = _png(_canvas(20_000, 40)), _png(_canvas(40, 20_000))
    add("aspect_20000x40", "20000x40 PNG", errors.IMAGE_TOO_LARGE if limits.max_side < 20_000
        else errors.IMAGE_TOO_SMALL if limits.min_side > 40 else errors.NO_FACE_IN_SOURCE, src=wide)
    add("aspect_40x20000", "40x20000 PNG", errors.IMAGE_TOO_LARGE if limits.max_side < 20_000
        else errors.IMAGE_TOO_SMALL if limits.min_side > 40 else errors.NO_FACE_IN_TARGET, tgt=tall)
    add("aspect_1000x31", "1000x31 PNG", errors.IMAGE_TOO_SMALL, src=_png(_canvas(1000, 31)))
    add("aspect_at_limits", f"{limits.max_side}x{limits.min_side} PNG (exactly at the side limits)",
        errors.NO_FACE_IN_SOURCE, src=_png(_canvas(limits.max_side, limits.min_side)))
    add("strip_4000x160_with_face", "4000x160 strip with a 150 px face", OK,
        src=_png(_with_face(4000, 160, 150, 1900, 5)))
    add("over_byte_limit", f"valid JPEG padded to {limits.max_bytes + 1:,} bytes (limit + 1)",
        errors.IMAGE_TOO_LARGE, src=padded_jpeg(limits.max_bytes + 1), heavy=True)
    add("at_byte_limit", f"valid JPEG padded to exactly {limits.max_bytes:,} bytes", OK,
        src=padded_jpeg(limits.max_bytes), heavy=True)
    return tuple(cases)


def check_result(case: HostileCase, image: bytes, metadata: dict) -> list[str]:
    """What is wrong with an OK answer to `case` (empty when it is right)."""
    problems = []
    fused = decode_image(image)
    size = (fused.shape[1], fused.shape[0])
    if case.expected_size and size != case.expected_size:
        problems.append(f"output is {size[0]}x{size[1]}, expected {case.expected_size[0]}x{case.expected_size[1]}")
    if case.forbidden and case.forbidden in image:
        problems.append(f"output carries the smuggled payload {case.forbidden[:20]!r}")
    if case.upright_target is not None and size == case.upright_target.shape[1::-1]:
        # Away from the fused face only the invisible watermark changes pixels; a mirrored or rotated decode of
        # the target differs everywhere. Compare low-passed images outside the chosen face's grown box.
        x1, y1, x2, y2 = metadata["target"]["faces"][metadata["target"]["chosen_face"]]["box"]
        dx, dy = (x2 - x1), (y2 - y1)
        far = np.ones(fused.shape[:2], bool)
        far[max(0, int(y1 - dy)):int(y2 + dy), max(0, int(x1 - dx)):int(x2 + dx)] = False
        blur = [cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), 3) for rgb in (fused, case.upright_target)]
        change = float(np.abs(blur[0] - blur[1])[far].mean())
        if change > 4.0:
            problems.append(f"output differs from the upright target away from the face (mean {change:.1f})")
    return problems

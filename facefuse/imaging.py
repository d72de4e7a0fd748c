"""Image bytes <-> RGB arrays: strict, bounded decoding and metadata-carrying encoding.

Decoding is the service's first contact with untrusted bytes, so every size limit is checked from the header
*before* any pixel is decoded, and every failure becomes a ``FusionError`` with a stable code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import PIL
from PIL import BmpImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from facefuse.errors import IMAGE_TOO_LARGE, IMAGE_TOO_SMALL, INVALID_IMAGE, FusionError

SUPPORTED_INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # Pillow format names
OUTPUT_FORMATS = ("jpeg", "png", "webp")

_SUPPORTED_TEXT = "JPEG, PNG, WebP or BMP"
_XMP_PNG_KEY = "XML:com.adobe.xmp"
_XMP_JPEG_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_EXIF_ORIENTATION = 0x0112

# Pillow's plugin classes, opened directly rather than through Image.open: Image.open runs Pillow's own global
# decompression-bomb check (a warning or an exception, depending on MAX_IMAGE_PIXELS) before we could apply our
# limits; the constructors only parse headers, so our limits decide, thread-safely, with no warning filters.
_OPENERS: dict[str, type[ImageFile.ImageFile]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
}

# Recognised but refused, so that the message can name what was sent.
_UNSUPPORTED_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypavif", 4, "AVIF"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"%PDF", 0, "PDF"),
    (b"<svg", 0, "SVG"),
    (b"<?xml", 0, "XML/SVG"),
)

# EXIF orientation -> Pillow transpose that brings the stored pixels upright (same table as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # width*height from the header, checked before decoding (decompression bombs)
    max_side: int = 12_000
    min_side: int = 32


_DEFAULT_LIMITS = ImageLimits()


def _sniff_format(data: bytes) -> str | None:
    """Pillow format name from the magic bytes, or None; avoids letting Pillow try every plugin it knows."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    return None


def _unsupported_name(data: bytes) -> str | None:
    for magic, offset, name in _UNSUPPORTED_MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return name
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from the first WebP chunk header (VP8 lossy, VP8L lossless or VP8X extended), or None."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _open_header(data: bytes, role: str, limits: ImageLimits | None = None) -> tuple[ImageFile.ImageFile, str]:
    """Parse only the header of a supported image; INVALID_IMAGE for anything else.

    With ``limits``, a WebP's size is checked before Pillow sees it: libwebp allocates the whole canvas when its
    decoder object is created, i.e. already while Pillow "opens" the file.
    """
    if not data:
        raise FusionError(INVALID_IMAGE, f"the {role} image is empty (0 bytes)")
    fmt = _sniff_format(data)
    if fmt is None:
        other = _unsupported_name(data)
        if other is not None:
            raise FusionError(INVALID_IMAGE, f"the {role} image is {other}, which is not supported; "
                                             f"send {_SUPPORTED_TEXT}")
        raise FusionError(INVALID_IMAGE, f"the {role} image is not a recognised image format; "
                                         f"send {_SUPPORTED_TEXT}")
    if fmt == "WEBP" and limits is not None:
        size = _webp_canvas_size(data)
        if size is None:
            raise FusionError(INVALID_IMAGE, f"the {role} image could not be read as WEBP (no size in its header)")
        _check_limits(*size, limits, role)
    try:
        im = _OPENERS[fmt](io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # WebP's opener applies Pillow's hard limit itself
        raise FusionError(IMAGE_TOO_LARGE, f"the {role} image is too large ({_short(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is the caller's bad image
        raise FusionError(INVALID_IMAGE, f"the {role} image could not be read as {fmt} "
                                         f"({_short(exc)})") from None
    return im, fmt


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - corrupt EXIF must not fail an otherwise good image
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _webp_orientation(data: bytes) -> int:
    """EXIF orientation from a WebP's EXIF chunk, walking the RIFF chunks (no decoder, hence no canvas)."""
    offset = 12
    while offset + 8 <= len(data):
        kind, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8], "little")
        if kind == b"EXIF":
            exif = Image.Exif()
            try:
                exif.load(data[offset + 8:offset + 8 + size])
                value = int(exif.get(_EXIF_ORIENTATION, 1))
            except Exception:  # noqa: BLE001 - corrupt EXIF reads as upright
                return 1
            return value if value in _ORIENTATION_TRANSPOSE else 1
        offset += 8 + size + (size & 1)
    return 1


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), read from the header without decoding pixels.

    A PNG eXIf chunk placed after the image data is not seen here (decode_image does apply it).

    Raises FusionError(INVALID_IMAGE) when the bytes are not a readable JPEG/PNG/WebP/BMP header.
    """
    data = b"" if data is None else bytes(data)
    if _sniff_format(data) == "WEBP":
        size = _webp_canvas_size(data)
        if size is None:
            raise FusionError(INVALID_IMAGE, "the image could not be read as WEBP (no size in its header)")
        width, height = size
        orientation = _webp_orientation(data)
    else:
        im, fmt = _open_header(data, "image")
        with im:
            width, height = im.size
            # Pillow's PNG getexif() decodes the whole image when no eXIf chunk precedes IDAT: header-only here.
            orientation = 1 if fmt == "PNG" and "exif" not in im.info else _orientation(im)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # 5-8 swap the axes


def _check_limits(width: int, height: int, limits: ImageLimits, role: str) -> None:
    if width <= 0 or height <= 0:
        raise FusionError(INVALID_IMAGE, f"the {role} image declares an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise FusionError(IMAGE_TOO_LARGE, f"the {role} image is {width}x{height} = {width * height:,} pixels; "
                                           f"the limit is {limits.max_pixels:,} pixels")
    if max(width, height) > limits.max_side:
        raise FusionError(IMAGE_TOO_LARGE, f"the {role} image is {width}x{height} pixels; "
                                           f"no side may exceed {limits.max_side} pixels")
    if min(width, height) < limits.min_side:
        raise FusionError(IMAGE_TOO_SMALL, f"the {role} image is {width}x{height} pixels; "
                                           f"each side must be at least {limits.min_side} pixels")


def _to_rgb(im: Image.Image) -> Image.Image | np.ndarray:
    """Any decoded mode -> RGB (a Pillow image, or an array for the 16-bit cases Pillow would clip)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        # Palette transparency (tRNS) must be composited like alpha, not dropped to its (arbitrary) colour.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert("L") clips 16-bit values at 255; scale to 8 bits instead.
        arr = np.asarray(im)
        arr = np.clip(arr.astype(np.int64, copy=False), 0, 65535) >> 8
        return np.repeat(arr.astype(np.uint8)[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.clip(np.asarray(im), 0.0, 255.0).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent areas read as white paper
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, RGBX...


def decode_image(data: bytes, limits: ImageLimits = _DEFAULT_LIMITS, role: str = "image") -> np.ndarray:
    """Decode untrusted image bytes to an upright HxWx3 uint8 RGB C-contiguous (writable) array.

    Raises FusionError: INVALID_IMAGE (empty, corrupt, truncated, unsupported format), IMAGE_TOO_LARGE (bytes,
    pixels or a side over the limits, checked before decoding), IMAGE_TOO_SMALL (a side under ``min_side``).
    """
    data = b"" if data is None else bytes(data)  # also accepts bytearray / memoryview / numpy bytes
    if len(data) > limits.max_bytes:
        raise FusionError(IMAGE_TOO_LARGE, f"the {role} image is {len(data):,} bytes; "
                                           f"the limit is {limits.max_bytes:,} bytes")
    im, fmt = _open_header(data, role, limits)
    try:
        width, height = im.size
        _check_limits(width, height, limits, role)
        try:
            return _decode_opened(im)
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
            text = _short(exc)
            detail = f"truncated {fmt} data" if "truncated" in text.lower() else f"corrupt {fmt} data: {text}"
            raise FusionError(INVALID_IMAGE, f"the {role} image could not be decoded ({detail})") from None
    finally:
        im.close()


def _decode_opened(im: ImageFile.ImageFile) -> np.ndarray:
    im.load()  # a freshly opened animated WebP / APNG is on its first frame: that one is decoded
    orientation = _orientation(im)
    rgb = _to_rgb(im)
    if isinstance(rgb, np.ndarray):
        rgb = Image.fromarray(rgb, "RGB") if orientation != 1 else rgb
    if isinstance(rgb, Image.Image):
        if orientation != 1:
            rgb = rgb.transpose(_ORIENTATION_TRANSPOSE[orientation])
        rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:  # defensive: should be unreachable
        raise ValueError(f"unexpected decoded layout {rgb.dtype} {rgb.shape}")
    if not rgb.flags.writeable or not rgb.flags.c_contiguous:
        # np.asarray of a Pillow image is a read-only array over its bytes; callers get a writable one.
        rgb = np.array(rgb, dtype=np.uint8, order="C")
    return rgb


def insert_jpeg_xmp(jpeg: bytes, xmp: bytes) -> bytes:
    """``jpeg`` with an APP1 XMP segment, placed where Pillow puts its own: after a leading JFIF APP0 segment, else
    right after SOI (for encoders without XMP support: an old Pillow, nvJPEG)."""
    payload = _XMP_JPEG_HEADER + xmp
    if len(payload) + 2 > 0xFFFF:
        raise ValueError("XMP packet too long for one JPEG APP1 segment")
    position = 4 + int.from_bytes(jpeg[4:6], "big") if jpeg[2:4] == b"\xff\xe0" else 2
    return jpeg[:position] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[position:]


# Pillow >= 11 writes JPEG XMP itself (``save(..., xmp=...)``); older ones get the segment inserted by hand.
_JPEG_SAVE_XMP = int(PIL.__version__.split(".")[0]) >= 11


def encode_image(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 92, xmp: bytes | None = None,
                 text: dict[str, str] | None = None) -> bytes:
    """Encode an HxWx3 uint8 RGB array; embed the XMP packet where each format keeps it.

    JPEG: APP1 XMP segment; PNG: uncompressed iTXt ``XML:com.adobe.xmp`` plus a tEXt chunk per ``text`` entry;
    WebP: the XMP chunk. ``text`` is written to PNG only (JPEG and WebP have no standard key/value text).
    ``quality`` applies to JPEG and WebP; PNG is lossless.
    """
    fmt = fmt.lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unsupported output format {fmt!r}; expected one of {OUTPUT_FORMATS}")
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {arr.dtype} {arr.shape}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be 1..100, got {quality}")
    image = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    out = io.BytesIO()
    if fmt == "jpeg":
        if xmp and _JPEG_SAVE_XMP:
            image.save(out, "JPEG", quality=int(quality), xmp=xmp)
            return out.getvalue()
        image.save(out, "JPEG", quality=int(quality))
        return insert_jpeg_xmp(out.getvalue(), xmp) if xmp else out.getvalue()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if xmp:
            info.add_itxt(_XMP_PNG_KEY, xmp.decode("utf-8"), zip=False)  # uncompressed: findable by byte search
        for key, value in (text or {}).items():
            info.add_text(key, value)
        # Level 1: several times faster than the default 6 on photos, for a few percent more bytes.
        image.save(out, "PNG", pnginfo=info, compress_level=1)
        return out.getvalue()
    # WebP: Pillow's xmp= writes the XMP chunk (VP8X container). method=2 (effort, not quality): about half the
    # time of libwebp's default 4 on 1080p photos for ~2% more bytes.
    image.save(out, "WEBP", quality=int(quality), method=2, **({"xmp": xmp} if xmp else {}))
    return out.getvalue()

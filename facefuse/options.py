"""The OPTIONS JSON of wire interface v1, parsed and validated in one place."""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from facefuse.errors import INVALID_DEGREE, INVALID_OPTIONS, FusionError
from facefuse.imaging import OUTPUT_FORMATS
from facefuse.watermark import parse_watermark_id

MAX_OPTIONS_BYTES = 16 * 1024
_KNOWN_KEYS = ("source_face", "target_face", "format", "quality", "watermark_id", "visible_label", "consent")
MAX_CONSENT_CHARS = 256  # a consent token is a short secret (facefuse/consent.py)


@dataclass(frozen=True)
class FusionOptions:
    source_face: int = 0
    target_face: int = 0
    format: str = "jpeg"
    quality: int = 92
    watermark_id: str = ""  # 16 hex digits; empty means "draw a random one"
    visible_label: bool = False
    # true, or a token string; what the deployment requires is preprocess's `consent` parameter (consent.py)
    consent: bool | str = field(default=False, repr=False)  # repr=False: may be a secret token

    def with_watermark_id(self) -> FusionOptions:
        """A copy whose watermark id is set, drawing a random 64-bit one when the caller gave none."""
        if self.watermark_id:
            return self
        return FusionOptions(**{**self.__dict__, "watermark_id": f"{secrets.randbits(64):016x}"})


def _face_index(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FusionError(INVALID_OPTIONS, f"'{key}' must be a face index >= 0 (0 = largest face), got {value!r}")
    return value


def parse_options(raw: bytes | str | None) -> FusionOptions:
    """Parse the OPTIONS tensor's UTF-8 JSON object; empty input means all defaults."""
    if raw is None:
        return FusionOptions()
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    if len(raw) > MAX_OPTIONS_BYTES:
        raise FusionError(INVALID_OPTIONS, f"OPTIONS is {len(raw)} bytes; the limit is {MAX_OPTIONS_BYTES}")
    if not raw.strip():
        return FusionOptions()
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FusionError(INVALID_OPTIONS, "OPTIONS is not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise FusionError(INVALID_OPTIONS, f"OPTIONS is not valid JSON ({error.msg} at char {error.pos})") from None
    except (RecursionError, ValueError) as error:
        # Valid JSON that Python refuses to build: nesting deeper than the recursion limit, or an integer longer
        # than sys.get_int_max_str_digits(). Both are the caller's input, not a fault of the service.
        reason = "nested too deeply" if isinstance(error, RecursionError) else "has a number too long to parse"
        raise FusionError(INVALID_OPTIONS, f"OPTIONS {reason}") from None
    if not isinstance(parsed, dict):
        raise FusionError(INVALID_OPTIONS, f"OPTIONS must be a JSON object, got {type(parsed).__name__}")
    unknown = sorted(set(parsed) - set(_KNOWN_KEYS))
    if unknown:
        raise FusionError(INVALID_OPTIONS, f"unknown OPTIONS key(s) {unknown}; known keys: {list(_KNOWN_KEYS)}")
    values: dict[str, Any] = {}
    for key in ("source_face", "target_face"):
        if key in parsed:
            values[key] = _face_index(parsed[key], key)
    if "format" in parsed:
        fmt = parsed["format"]
        fmt = "jpeg" if fmt == "jpg" else fmt
        if fmt not in OUTPUT_FORMATS:
            raise FusionError(INVALID_OPTIONS, f"'format' must be one of {list(OUTPUT_FORMATS)}, got {fmt!r}")
        values["format"] = fmt
    if "quality" in parsed:
        quality = parsed["quality"]
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise FusionError(INVALID_OPTIONS, f"'quality' must be an integer 1..100, got {quality!r}")
        values["quality"] = quality
    if "watermark_id" in parsed:
        text = parsed["watermark_id"]
        try:
            values["watermark_id"] = f"{parse_watermark_id(text):016x}"
        except (TypeError, ValueError):
            raise FusionError(INVALID_OPTIONS, f"'watermark_id' must be 1-16 hex digits, got {text!r}") from None
    if "visible_label" in parsed:
        if not isinstance(parsed["visible_label"], bool):
            label = parsed["visible_label"]
            raise FusionError(INVALID_OPTIONS, f"'visible_label' must be true or false, got {label!r}")
        values["visible_label"] = parsed["visible_label"]
    if "consent" in parsed:
        consent = parsed["consent"]
        if not isinstance(consent, bool) and not (isinstance(consent, str) and 0 < len(consent) <= MAX_CONSENT_CHARS):
            # The value may be a secret token: say what is wrong with it, never echo it.
            raise FusionError(INVALID_OPTIONS, f"'consent' must be true, false or a token string of 1-"
                                               f"{MAX_CONSENT_CHARS} characters, got a {type(consent).__name__}")
        values["consent"] = consent
    return FusionOptions(**values)


def validate_degree(value: Any, name: str) -> float:
    """A degree must be a finite number in 0..100."""
    try:
        degree = float(value)
    except (TypeError, ValueError):
        raise FusionError(INVALID_DEGREE, f"{name} must be a number in 0..100, got {value!r}") from None
    if not math.isfinite(degree) or not 0.0 <= degree <= 100.0:
        raise FusionError(INVALID_DEGREE, f"{name} must be in 0..100, got {degree}")
    return degree

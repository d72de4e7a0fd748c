"""Stable error codes of wire interface v1 (DESIGN.md section 3).

Every failure that reaches a client is a message ``CODE: human sentence``. Codes are never reused or renamed.
"""

from __future__ import annotations

INVALID_IMAGE = "INVALID_IMAGE"
IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
IMAGE_TOO_SMALL = "IMAGE_TOO_SMALL"
NO_FACE_IN_SOURCE = "NO_FACE_IN_SOURCE"
NO_FACE_IN_TARGET = "NO_FACE_IN_TARGET"
FACE_TOO_SMALL = "FACE_TOO_SMALL"
FACE_INDEX_OUT_OF_RANGE = "FACE_INDEX_OUT_OF_RANGE"
INVALID_DEGREE = "INVALID_DEGREE"
INVALID_OPTIONS = "INVALID_OPTIONS"
# Added after v1's first list: a fault inside the service, not the caller's input.
INTERNAL_ERROR = "INTERNAL_ERROR"
# Refusals by the API gateway (gateway/nginx.conf.template) before a request reaches Triton.
UNAUTHENTICATED = "UNAUTHENTICATED"
PERMISSION_DENIED = "PERMISSION_DENIED"
RATE_LIMITED = "RATE_LIMITED"
REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
UNIMPLEMENTED = "UNIMPLEMENTED"
GATEWAY_CODES = (UNAUTHENTICATED, PERMISSION_DENIED, RATE_LIMITED, REQUEST_TOO_LARGE, SERVICE_UNAVAILABLE,
                 UNIMPLEMENTED)
# Safety refusals by preprocess (README "Safety"): the source face matches the identity blocklist; the deployment
# requires the caller to assert the source person's consent (OPTIONS `consent`) and it was missing or wrong.
BLOCKED_IDENTITY = "BLOCKED_IDENTITY"
CONSENT_REQUIRED = "CONSENT_REQUIRED"

ALL_CODES = (
    INVALID_IMAGE,
    IMAGE_TOO_LARGE,
    IMAGE_TOO_SMALL,
    NO_FACE_IN_SOURCE,
    NO_FACE_IN_TARGET,
    FACE_TOO_SMALL,
    FACE_INDEX_OUT_OF_RANGE,
    INVALID_DEGREE,
    INVALID_OPTIONS,
    INTERNAL_ERROR,
    *GATEWAY_CODES,
    BLOCKED_IDENTITY,
    CONSENT_REQUIRED,
)


class FusionError(Exception):
    """A request-level failure carrying a stable code; ``str()`` is the wire message."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ALL_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def is_client_error(self) -> bool:
        return self.code != INTERNAL_ERROR


def split_error_message(text: str) -> tuple[str, str]:
    """Find ``CODE: sentence`` in a (possibly prefixed) server message; ``("", text)`` when absent."""
    for code in ALL_CODES:
        marker = f"{code}: "
        index = text.find(marker)
        if index >= 0:
            return code, text[index + len(marker):].strip()
    return "", text

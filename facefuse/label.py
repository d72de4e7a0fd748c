"""The optional visible "AI-generated" label (OPTIONS `visible_label`).

Its text and corner are the operator's (postprocess parameters `label_text`, `label_position`), never the caller's:
a caller who could rewrite the mark could make it say nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_LABEL = "AI-generated"
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")
DEFAULT_POSITION = "bottom-right"
MAX_LABEL_CHARS = 64
_FONT = cv2.FONT_HERSHEY_SIMPLEX
# Text height (cap height, pixels): 2.8% of the shorter side, at least 11 px (below that Hershey strokes blur into
# each other); only an image too narrow for the text at that size gets smaller text.
_TEXT_HEIGHT_FRACTION = 0.028
_MIN_TEXT_HEIGHT = 11
_MAX_BOX_WIDTH_FRACTION = 0.9
_BOX_KEEP = 0.35  # the box keeps 35% of the pixels under it: white text on it has a contrast ratio >= 7:1


@dataclass(frozen=True)
class LabelLayout:
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive), inside the image
    origin: tuple[int, int]  # cv2.putText's bottom-left of the text
    scale: float
    thickness: int


def validate_label(text: str, position: str = DEFAULT_POSITION) -> None:
    """ValueError unless `text` is 1-64 printable ASCII characters (what the Hershey font draws) and `position` is one
    of POSITIONS; postprocess checks its parameters with this at load."""
    if (not isinstance(text, str) or not text.strip() or len(text) > MAX_LABEL_CHARS
            or not all(" " <= char <= "~" for char in text)):
        raise ValueError(f"label text must be 1-{MAX_LABEL_CHARS} printable ASCII characters, not blank; "
                         f"got {text!r}")
    if position not in POSITIONS:
        raise ValueError(f"label position must be one of {list(POSITIONS)}, got {position!r}")


def label_layout(width: int, height: int, text: str = DEFAULT_LABEL,
                 position: str = DEFAULT_POSITION) -> LabelLayout:
    """Where and how large the label goes on a width x height image."""
    validate_label(text, position)
    (unit_width, unit_height), _ = cv2.getTextSize(text, _FONT, 1.0, 1)
    scale = max(_MIN_TEXT_HEIGHT, _TEXT_HEIGHT_FRACTION * min(width, height)) / unit_height
    # Padding inside the box is ~0.4 text heights on each side; shrink the text until the box fits the width.
    scale = min(scale, _MAX_BOX_WIDTH_FRACTION * width / (unit_width + 0.8 * unit_height))
    thickness = max(1, round(scale * 1.6))
    (text_width, text_height), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = max(2, round(0.4 * text_height))
    margin = max(1, round(0.015 * min(width, height)))
    box_width = min(width, text_width + 2 * pad)
    box_height = min(height, text_height + baseline + 2 * pad)
    x1 = width - margin - box_width if position.endswith("right") else margin
    y1 = height - margin - box_height if position.startswith("bottom") else margin
    x1, y1 = max(0, min(x1, width - box_width)), max(0, min(y1, height - box_height))
    return LabelLayout(box=(x1, y1, x1 + box_width, y1 + box_height), origin=(x1 + pad, y1 + pad + text_height),
                       scale=scale, thickness=thickness)


def draw_label(rgb: np.ndarray, text: str = DEFAULT_LABEL, position: str = DEFAULT_POSITION) -> np.ndarray:
    """A copy of `rgb` with `text` in white on a darkened box in the given corner, sized to the image."""
    height, width = rgb.shape[:2]
    layout = label_layout(width, height, text, position)
    x1, y1, x2, y2 = layout.box
    out = rgb.copy()
    out[y1:y2, x1:x2] = label_box(out[y1:y2, x1:x2], layout, text)
    return out


def label_box(box_pixels: np.ndarray, layout: LabelLayout, text: str = DEFAULT_LABEL) -> np.ndarray:
    """The label's box (the image's pixels inside ``layout.box``) darkened with the text drawn on it: all that the
    label changes, so that a GPU image needs only this region on the host."""
    x1, y1 = layout.box[:2]
    box = (box_pixels.astype(np.float32) * _BOX_KEEP).astype(np.uint8)
    # Draw into the box only, so that nothing outside it changes even when the text is clipped on a tiny image.
    cv2.putText(box, text, (layout.origin[0] - x1, layout.origin[1] - y1), _FONT, layout.scale, (255, 255, 255),
                layout.thickness, cv2.LINE_AA)
    return box

"""The optional visible "AI-generated" label."""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_LABEL = "AI-generated"


def draw_label(rgb: np.ndarray, text: str = DEFAULT_LABEL) -> np.ndarray:
    """Draw `text` bottom-right on a translucent dark box, sized to the image (legible from 64 px up)."""
    height, width = rgb.shape[:2]
    scale = max(0.35, min(width, height) / 900.0)
    thickness = max(1, round(scale * 2))
    (text_width, text_height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    margin = max(4, round(8 * scale))
    x1, y1 = max(0, width - text_width - 3 * margin), max(0, height - text_height - baseline - 3 * margin)
    x2, y2 = width - margin, height - margin
    out = rgb.copy()
    box = out[y1:y2, x1:x2].astype(np.float32)
    out[y1:y2, x1:x2] = (box * 0.35).astype(np.uint8)
    cv2.putText(out, text, (x1 + margin, y2 - margin - baseline // 2), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (255, 255, 255), thickness, cv2.LINE_AA)
    return out

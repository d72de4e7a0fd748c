"""The visible "AI-generated" label (legible, inside the image, the operator's text and corner) and the XMP
provenance every output format carries, read back with Pillow's own getxmp()."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from facefuse.errors import INVALID_OPTIONS, FusionError
from facefuse.imaging import OUTPUT_FORMATS, decode_image
from facefuse.label import DEFAULT_LABEL, DEFAULT_POSITION, POSITIONS, draw_label, label_layout, validate_label
from facefuse.options import FusionOptions, parse_options
from facefuse.pipeline import finish
from facefuse.provenance import DIGITAL_SOURCE_TYPE
from facefuse.samples import sample_image_path
from tests.conftest import REPO_ROOT


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """WCAG relative luminance of sRGB pixels."""
    c = rgb.astype(np.float64) / 255.0
    linear = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return linear @ np.array([0.2126, 0.7152, 0.0722])


def _contrast(labelled: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """WCAG contrast ratio between the text strokes (brightest 5% of the box) and the box (its median)."""
    x1, y1, x2, y2 = box
    luminance = _luminance(labelled[y1:y2, x1:x2]).ravel()
    text, background = np.percentile(luminance, 97), np.median(luminance)
    return (text + 0.05) / (background + 0.05)


def _photo(width: int, height: int) -> np.ndarray:
    return cv2.resize(decode_image(sample_image_path("t1.jpg").read_bytes()), (width, height),
                      interpolation=cv2.INTER_AREA)


IMAGES = {
    "photo 1920x1080": lambda: _photo(1920, 1080),
    "photo 300x300": lambda: _photo(300, 300),
    "white 1920x1080": lambda: np.full((1080, 1920, 3), 255, np.uint8),  # worst case for white text
    "white 300x300": lambda: np.full((300, 300, 3), 255, np.uint8),
    "black 300x300": lambda: np.zeros((300, 300, 3), np.uint8),
}


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("position", POSITIONS)
def test_label_is_legible_and_inside_the_image(name, position):
    rgb = IMAGES[name]()
    height, width = rgb.shape[:2]
    labelled = draw_label(rgb, DEFAULT_LABEL, position)
    layout = label_layout(width, height, DEFAULT_LABEL, position)
    x1, y1, x2, y2 = layout.box
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    # Nothing outside the box changes; the box is in the asked corner.
    outside = np.ones((height, width), bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(labelled[outside], rgb[outside])
    vertical, horizontal = position.split("-")
    assert (y2 > height * 0.9) if vertical == "bottom" else (y1 < height * 0.1)
    assert (x2 > width * 0.9) if horizontal == "right" else (x1 < width * 0.1)
    # Legible: text at least 11 px high (about 2.8% of the shorter side on large images), contrast >= 4.5:1 (WCAG
    # AA) between the strokes and the box.
    (_, text_height), _ = cv2.getTextSize(DEFAULT_LABEL, cv2.FONT_HERSHEY_SIMPLEX, layout.scale, layout.thickness)
    assert text_height >= max(11, 0.025 * min(width, height))
    ratio = _contrast(labelled, layout.box)
    print(f"{name} {position}: box {layout.box}, text {text_height} px, contrast {ratio:.1f}:1")
    assert ratio >= 4.5
    # The text itself was drawn: the box holds near-white pixels the darkened image never has.
    assert (labelled[y1:y2, x1:x2].min(axis=-1) > 200).sum() > 20


def test_default_is_bottom_right_ai_generated():
    assert (DEFAULT_LABEL, DEFAULT_POSITION) == ("AI-generated", "bottom-right")


def test_tiny_and_narrow_images_keep_the_label_inside():
    for width, height in ((32, 32), (64, 48), (40, 600), (600, 40)):
        rgb = np.full((height, width, 3), 200, np.uint8)
        labelled = draw_label(rgb, "A much longer operator label text")
        x1, y1, x2, y2 = label_layout(width, height, "A much longer operator label text").box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert labelled.shape == rgb.shape


@pytest.mark.parametrize("text,position", [("", DEFAULT_POSITION), ("   ", DEFAULT_POSITION),
                                           ("x" * 65, DEFAULT_POSITION), ("KI-generiert ✓", DEFAULT_POSITION),
                                           ("ok", "centre"), ("ok", "bottom")])
def test_bad_label_parameters_are_refused(text, position):
    with pytest.raises(ValueError):
        validate_label(text, position)


def test_postprocess_config_names_the_label():
    config = text_format.Parse((REPO_ROOT / "model_repository" / "postprocess" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    text, position = config.parameters["label_text"].string_value, config.parameters["label_position"].string_value
    assert (text, position) == (DEFAULT_LABEL, DEFAULT_POSITION)
    validate_label(text, position)


@pytest.mark.parametrize("key", ["label_text", "label_position"])
def test_options_cannot_change_the_label(key):
    with pytest.raises(FusionError) as caught:
        parse_options(f'{{"visible_label": true, "{key}": "x"}}')
    assert caught.value.code == INVALID_OPTIONS


def _finish(fmt: str, visible_label: bool, **label) -> tuple[np.ndarray, bytes]:
    """postprocess's finish() on a 300x300 target with an all-zero blend mask (the pasted crop leaves it as is)."""
    target = _photo(300, 300)
    crop = np.zeros((3, 256, 256), np.float32)
    mask = np.zeros((1, 256, 256), np.float32)
    matrix = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    options = FusionOptions(format=fmt, visible_label=visible_label, watermark_id="00000000000000ab")
    encoded, metadata = finish(target, crop, mask, matrix, options, {}, **label)
    assert metadata["visible_label"] is visible_label
    return target, encoded


def test_finish_draws_the_operators_label_where_asked():
    target, plain = _finish("png", False)
    _, default = _finish("png", True)
    _, custom = _finish("png", True, label_text="Synthetic", label_position="top-left")
    for data, position, text in ((default, "bottom-right", DEFAULT_LABEL), (custom, "top-left", "Synthetic")):
        x1, y1, x2, y2 = label_layout(300, 300, text, position).box
        change = np.abs(decode_image(data).astype(int) - decode_image(plain).astype(int)).max(axis=-1)
        inside = change[y1:y2, x1:x2].copy()
        change[y1:y2, x1:x2] = 0
        assert inside.mean() > 40 and np.percentile(change, 99) <= 2  # outside: the watermark only


def _xmp_values(tree) -> list[str]:
    if isinstance(tree, dict):
        return [value for child in tree.values() for value in _xmp_values(child)]
    if isinstance(tree, list | tuple):
        return [value for child in tree for value in _xmp_values(child)]
    return [str(tree)]


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
@pytest.mark.parametrize("visible_label", [False, True])
def test_every_output_declares_itself_ai_composited_in_xmp(fmt, visible_label):
    """Pillow's getxmp() (defusedxml, pinned in requirements.txt) finds IPTC digitalSourceType in JPEG, PNG, WebP."""
    _, data = _finish(fmt, visible_label)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
        xmp = image.getxmp()
    description = xmp["xmpmeta"]["RDF"]["Description"]
    assert description["DigitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert DIGITAL_SOURCE_TYPE.endswith("/compositeWithTrainedAlgorithmicMedia")
    assert description["WatermarkId"] == "00000000000000ab" and description["AIGenerated"] == "True"
    assert DIGITAL_SOURCE_TYPE in _xmp_values(xmp)

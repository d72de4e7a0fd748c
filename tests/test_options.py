"""OPTIONS parsing and degree validation: every bad value gets its stable code."""

import pytest

from facefuse.errors import INVALID_DEGREE, INVALID_OPTIONS, FusionError, split_error_message
from facefuse.options import FusionOptions, parse_options, validate_degree


def test_empty_options_give_defaults():
    assert parse_options(b"") == FusionOptions()
    assert parse_options(b"{}") == FusionOptions()
    assert parse_options(None) == FusionOptions()


def test_all_keys_parse():
    options = parse_options(b'{"source_face": 2, "target_face": 1, "format": "png", "quality": 80,'
                            b' "watermark_id": "0xABC", "visible_label": true}')
    assert options == FusionOptions(2, 1, "png", 80, "0000000000000abc", True)


@pytest.mark.parametrize("raw", [b"{", b"[]", b'"x"', b"\xff\xfe", b'{"source_face": -1}', b'{"source_face": 1.5}',
                                 b'{"format": "gif"}', b'{"quality": 0}', b'{"quality": true}', b'{"nope": 1}',
                                 b'{"watermark_id": "xyz"}', b'{"watermark_id": "1234567890abcdef0"}',
                                 b'{"visible_label": "yes"}', b"{" + b" " * 20000 + b"}",
                                 # Valid JSON that json.loads cannot build (RecursionError, ValueError).
                                 b"[" * 5000 + b"]" * 5000, b'{"target_face": ' + b"9" * 5000 + b"}"])
def test_bad_options_are_invalid_options(raw):
    with pytest.raises(FusionError) as caught:
        parse_options(raw)
    assert caught.value.code == INVALID_OPTIONS
    assert str(caught.value).startswith("INVALID_OPTIONS: ")


def test_random_watermark_id_is_drawn_once():
    options = FusionOptions().with_watermark_id()
    assert len(options.watermark_id) == 16
    assert options.with_watermark_id() == options


@pytest.mark.parametrize("value", [0, 0.0, 37.5, 100])
def test_valid_degrees(value):
    assert validate_degree(value, "FACE_DEGREE") == float(value)


@pytest.mark.parametrize("value", [-0.01, 100.01, float("nan"), float("inf"), "abc", None])
def test_invalid_degrees(value):
    with pytest.raises(FusionError) as caught:
        validate_degree(value, "FACE_DEGREE")
    assert caught.value.code == INVALID_DEGREE


def test_split_error_message_finds_the_code_behind_triton_prefixes():
    assert split_error_message("in ensemble 'face_fusion', NO_FACE_IN_SOURCE: no face") == ("NO_FACE_IN_SOURCE",
                                                                                            "no face")
    assert split_error_message("something else") == ("", "something else")

"""Property-based tests (hypothesis) of decoding, field detection and crop.

Whatever the bytes or pixels, the preprocessing functions either return what their
docstrings promise or raise the documented `ImageError`: no other exception, no
crash, no hang (each example has a deadline). Examples are derandomized so CI
sees the same ones every run; max_examples stays modest to keep the file fast.
"""

import math
import os
import tempfile

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from input_pipeline import preprocessing
from input_pipeline.preprocessing import Circle, ImageError, PreprocessConfig

SETTINGS = settings(max_examples=100, deadline=5000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

MAGIC = [b"", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"\x89PNG\r\n\x1a\n", b"BM",
         b"II*\x00", b"MM\x00*", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 "]


def _disc(size: int = 24) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    cv2.circle(img, (size // 2, size // 2), size // 2 - 2, (200, 100, 50), -1)
    return img


VALID = {ext: cv2.imencode(ext, _disc())[1].tobytes() for ext in (".jpg", ".png", ".bmp",
                                                                  ".tif")}


def _read(data: bytes, target_size: int | None = None):
    """read_image_with_info on `data` written to a temporary file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image")
        with open(path, "wb") as f:
            f.write(data)
        return preprocessing.read_image_with_info(path, target_size)


def _assert_decoded_or_image_error(data: bytes, target_size: int | None = None) -> None:
    try:
        img, info = _read(data, target_size)
    except ImageError as e:
        assert e.reason and "\n" not in e.reason
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] >= 1 and img.shape[1] >= 1
    assert info["decode_scale"] in (1, 2, 4, 8)


@SETTINGS
@given(magic=st.sampled_from(MAGIC), tail=st.binary(max_size=512))
def test_decode_random_bytes(magic, tail):
    _assert_decoded_or_image_error(magic + tail)


@st.composite
def _mutated(draw):
    """A valid small image file with bytes cut, flipped or inserted."""
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["cut", "flip", "insert"]))
        if how == "cut":
            data = data[:i]
        elif how == "flip":
            data[i] = draw(st.integers(0, 255))
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        if not data:
            break
    return bytes(data)


@SETTINGS
@given(data=_mutated(), target=st.sampled_from([None, 8, 64]))
def test_decode_mutated_images(data, target):
    _assert_decoded_or_image_error(data, target)


_images = hnp.arrays(np.uint8, st.tuples(st.integers(1, 48), st.integers(1, 48),
                                         st.just(3)))


@st.composite
def _fields(draw):
    """A disc of random position, size and brightness on a noisy border, or noise."""
    h, w = draw(st.integers(8, 96)), draw(st.integers(8, 96))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    img = rng.integers(0, draw(st.integers(1, 40)), (h, w, 3), dtype=np.uint8)
    centre = (draw(st.integers(-w, 2 * w)), draw(st.integers(-h, 2 * h)))
    colour = tuple(draw(st.integers(0, 255)) for _ in range(3))
    cv2.circle(img, centre, draw(st.integers(1, 2 * max(h, w))), colour, -1)
    return img


def _assert_circle(circle: Circle | None, shape) -> None:
    if circle is None:
        return
    assert all(math.isfinite(v) for v in circle) and circle.r > 0
    assert 0 <= circle.cx <= shape[1] and 0 <= circle.cy <= shape[0]  # documented


@SETTINGS
@given(img=st.one_of(_images, _fields()))
def test_find_fundus_returns_a_circle_inside_or_none(img):
    _assert_circle(preprocessing.find_fundus(img), img.shape)


@SETTINGS
@given(img=_images, cx=st.floats(-100, 150), cy=st.floats(-100, 150),
       r=st.floats(0.01, 120))
def test_crop_fundus_any_circle_gives_the_documented_square(img, cx, cy, r):
    out = preprocessing.crop_fundus(img, Circle(cx, cy, r))
    side = max(1, round(2 * r))
    assert out.shape == (side, side, 3) and out.dtype == np.uint8


@SETTINGS
@given(img=st.one_of(_images, _fields()))
def test_crop_fundus_without_a_circle_crops_or_raises_image_error(img):
    try:
        out = preprocessing.crop_fundus(img)
    except ImageError as e:
        assert e.reason == "no fundus field found"
        return
    assert out.ndim == 3 and out.shape[0] == out.shape[1] >= 1


@pytest.mark.parametrize("crop", ["fundus", "none"])
@SETTINGS
@given(img=st.one_of(_images, _fields()))
def test_process_image_gives_the_output_size_or_image_error(crop, img):
    config = PreprocessConfig(image_size=32, crop=crop)
    data = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image.png")
        with open(path, "wb") as f:
            f.write(data)
        try:
            out, _ = preprocessing.process_image(path, config)
        except ImageError as e:
            assert crop == "fundus" and e.reason == "no fundus field found"
            return
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8

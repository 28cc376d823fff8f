"""Tests of input_pipeline/preprocessing.py on small hand-made arrays and files."""

import pathlib
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from input_pipeline import preprocessing as pp
from input_pipeline.preprocessing import Circle, ImageError

ORANGE = (200, 90, 40)  # RGB, a typical fundus albedo


def disc_image(h: int, w: int, circle: Circle, color=ORANGE) -> np.ndarray:
    """uint8 RGB [h, w, 3]: black frame with a filled disc (clipped by the frame)."""
    img = np.zeros((h, w, 3), np.uint8)
    cv2.circle(img, (round(circle.cx), round(circle.cy)), round(circle.r), color, -1)
    return img


def write_rgb(path, img: np.ndarray, params=()) -> str:
    """Writes uint8/uint16 RGB(A) or gray with OpenCV (which wants BGR order)."""
    if img.ndim == 3:
        code = cv2.COLOR_RGBA2BGRA if img.shape[2] == 4 else cv2.COLOR_RGB2BGR
        img = cv2.cvtColor(img, code)
    assert cv2.imwrite(str(path), img, list(params))
    return str(path)


def assert_circle_close(found: Circle | None, true: Circle, tol: float) -> None:
    assert found is not None
    assert abs(found.cx - true.cx) <= tol, (found, true)
    assert abs(found.cy - true.cy) <= tol, (found, true)
    assert abs(found.r - true.r) <= tol, (found, true)


# --------------------------------------------------------------------------- decoding


def test_read_png_keeps_rgb_order_and_values(tmp_path):
    img = np.zeros((4, 6, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 250, 10, 3
    img[1, 2] = (1, 2, 3)
    path = str(tmp_path / "rgb.png")
    Image.fromarray(img).save(path)  # Pillow writes RGB, no OpenCV on this side
    out, info = pp.read_image_with_info(path)
    np.testing.assert_array_equal(out, img)
    assert out.dtype == np.uint8 and info["converted"] == ""
    assert info["original_size"] == [4, 6] and info["format"] == "PNG"


def test_16bit_gray_png_is_rescaled_not_truncated(tmp_path):
    # round(v * 255 / 65535): 257 -> 1, 32896 -> 128, 128 -> 0 (0.498), 129 -> 1 (0.502);
    # truncation (v & 0xFF) or v >> 8 would give 1/128/128/129 or 1/128/0/0.
    values = np.array([[0, 257, 32896, 65535, 128, 129]], np.uint16)
    path = write_rgb(tmp_path / "g16.png", values)
    out, info = pp.read_image_with_info(path)
    assert out.shape == (1, 6, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255, 0, 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert info["converted"] == "16bit->8bit,gray->rgb"


def test_16bit_rgb_tiff(tmp_path):
    img = np.zeros((3, 5, 3), np.uint16)
    img[..., 0], img[..., 1], img[..., 2] = 65535, 32896, 257
    out, info = pp.read_image_with_info(write_rgb(tmp_path / "c16.tif", img))
    np.testing.assert_array_equal(out[0, 0], [255, 128, 1])
    assert info["converted"] == "16bit->8bit" and info["format"] == "TIFF"


def test_alpha_is_composited_on_black(tmp_path):
    img = np.zeros((1, 3, 4), np.uint8)
    img[0, :, :3] = (200, 100, 50)
    img[0, :, 3] = (255, 128, 0)
    out, info = pp.read_image_with_info(write_rgb(tmp_path / "rgba.png", img))
    # colour * alpha / 255, rounded: 200*128/255 = 100.4, 100*128/255 = 50.2, 50*128/255 = 25.1
    np.testing.assert_array_equal(out[0], [[200, 100, 50], [100, 50, 25], [0, 0, 0]])
    assert info["converted"] == "alpha->black"


def test_16bit_alpha_gray_alpha_palette_cmyk(tmp_path):
    rgba16 = np.zeros((2, 2, 4), np.uint16)
    rgba16[..., :3], rgba16[..., 3] = 65535, 32896  # white at ~50% opacity
    out, info = pp.read_image_with_info(write_rgb(tmp_path / "rgba16.png", rgba16))
    assert (out == 128).all() and info["converted"] == "alpha->black,16bit->8bit"

    la = np.zeros((1, 2, 2), np.uint8)
    la[..., 0], la[..., 1] = 200, (255, 64)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out, info = pp.read_image_with_info(tmp_path / "la.png")
    np.testing.assert_array_equal(out[0, :, 0], [200, 50])  # 200 * 64 / 255 = 50.2
    assert info["converted"] == "alpha->black,gray->rgb"

    Image.fromarray(np.full((4, 4, 3), (10, 200, 30), np.uint8)).convert("P").save(
            tmp_path / "pal.png")
    out, info = pp.read_image_with_info(tmp_path / "pal.png")
    assert out.shape == (4, 4, 3) and info["converted"] == "palette->rgb"
    assert out[0, 0, 1] > 150 > out[0, 0, 0]  # still green

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red
    out, info = pp.read_image_with_info(tmp_path / "cmyk.jpg")
    assert info["converted"] == "cmyk->rgb" and out[4, 4, 0] > 200 > 50 > out[4, 4, 1]


def test_grayscale_png_and_jpeg_are_replicated(tmp_path):
    gray = np.full((8, 8), 77, np.uint8)
    for name in ("g.png", "g.jpg"):
        out, info = pp.read_image_with_info(write_rgb(tmp_path / name, gray))
        assert out.shape == (8, 8, 3)
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        np.testing.assert_array_equal(out[..., 1], out[..., 2])
        assert abs(int(out[4, 4, 0]) - 77) <= 1
        assert info["converted"] == "gray->rgb"


def test_jpeg_colour_order(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    img[...] = (230, 30, 10)
    out = pp.read_image(write_rgb(tmp_path / "red.jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 98]))
    assert np.abs(out[8, 8].astype(int) - (230, 30, 10)).max() <= 4


@pytest.mark.parametrize("size,target,scale", [
    ((3504, 2336), 512, 4),   # 2336 / 4 = 584 >= 512, / 8 = 292 is too small
    ((3504, 2336), 256, 8),
    ((3504, 2336), 1024, 2),
    ((3504, 2336), 2336, 1),
    ((1000, 1000), 300, 2),
    ((1000, 1000), 250, 4),   # exactly the shorter side / 4
    ((3504, 2336), None, 1),
])
def test_reduced_scale_keeps_shorter_side(size, target, scale):
    assert pp.reduced_scale(size, target) == scale


def test_reduced_jpeg_decode(tmp_path):
    img = disc_image(600, 800, Circle(399.5, 299.5, 290))
    path = write_rgb(tmp_path / "wide.jpg", img)
    out, info = pp.read_image_with_info(path, target_size=128)
    assert info["decode_scale"] == 4 and info["original_size"] == [600, 800]
    assert out.shape == (150, 200, 3)
    full = cv2.resize(pp.read_image(path), (200, 150), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - full).mean() < 2.0


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no pixel data (a 'bomb' header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _bad_files(tmp_path) -> dict[str, str]:
    img = disc_image(64, 64, Circle(32, 32, 28))
    jpeg = pp.encode_jpeg(img)
    png = cv2.imencode(".png", img)[1].tobytes()
    files = {
        "missing": None,
        "empty": b"",
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "truncated_png": png[: len(png) // 2],
        "text_as_jpeg": b"patient_id,grade\n1,2\n" * 20,
        "bomb": _png_header_only(10_000, 7_000),  # 70 MP
    }
    paths = {}
    for name, data in files.items():
        path = tmp_path / (name + (".png" if "png" in name or name == "bomb" else ".jpg"))
        if data is not None:
            path.write_bytes(data)
        paths[name] = str(path)
    return paths


def test_every_bad_file_kind_has_its_own_reason(tmp_path):
    reasons = {}
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(ImageError) as e:
            pp.read_image(path, target_size=32)
        reasons[name] = e.value.reason
    assert reasons["missing"] == "file not found"
    assert "empty" in reasons["empty"]
    assert "truncated JPEG" in reasons["truncated_jpeg"]
    assert "truncated PNG" in reasons["truncated_png"]
    assert "not an image" in reasons["text_as_jpeg"]
    assert "too large" in reasons["bomb"]
    assert len(set(reasons.values())) == len(reasons)


def test_truncated_jpeg_that_opencv_would_decode_is_rejected(tmp_path):
    # The reason for the marker check: OpenCV returns a part-grey image here.
    path = _bad_files(tmp_path)["truncated_jpeg"]
    assert cv2.imread(path) is not None
    with pytest.raises(ImageError, match="truncated"):
        pp.read_image(path)


# --------------------------------------------------------------------------- field detection


@pytest.mark.parametrize("h,w,circle", [
    (200, 200, Circle(100, 96, 80)),      # square capture
    (200, 300, Circle(149, 100, 92)),     # 3:2 with black side borders
    (200, 300, Circle(150, 100, 130)),    # circle clipped by top and bottom of the frame
    (200, 300, Circle(160, 110, 120)),    # clipped, off-centre
    (1200, 1800, Circle(900, 600, 780)),  # large: detected at reduced size, scaled back
])
def test_find_fundus_geometry(h, w, circle):
    img = disc_image(h, w, circle)
    assert_circle_close(pp.find_fundus(img), circle, tol=max(1.5, 0.005 * circle.r))


def test_find_fundus_dark_and_uneven_jpeg():
    # Under-exposed field (a few grey levels above black) with one brighter half,
    # through JPEG (ringing at the rim) and sensor noise.
    circle = Circle(150, 100, 92)
    img = disc_image(200, 300, circle, color=(7, 4, 2)).astype(np.float32)
    inside = pp.circle_mask((200, 300), circle)
    img[inside & (np.arange(300)[None, :] < 120)] = (120, 80, 40)
    rng = np.random.default_rng(0)
    img += rng.normal(0, 0.7, img.shape) * inside[..., None]
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    img = cv2.imdecode(np.frombuffer(pp.encode_jpeg(img, 90), np.uint8), cv2.IMREAD_COLOR)
    assert_circle_close(pp.find_fundus(img), circle, tol=2.0)


def test_find_fundus_ignores_notch_and_letterbox():
    # A bright notch marker on the rim and a grey letterbox band clipping the bottom.
    circle = Circle(150, 100, 80)
    img = disc_image(220, 300, circle)
    cv2.fillConvexPoly(img, np.array([[205, 40], [222, 30], [215, 48]]), ORANGE)
    img[165:] = 0
    assert_circle_close(pp.find_fundus(img), circle, tol=2.0)


def test_find_fundus_grey_frame_around_field():
    # Field on a grey rectangle on black (a screenshot-like capture): the fit
    # must follow the bright disc, not the rectangle.
    img = np.zeros((240, 320, 3), np.uint8)
    img[30:210, 20:300] = 40
    circle = Circle(200, 120, 85)
    cv2.circle(img, (200, 120), 85, (230, 160, 120), -1)
    img[:, :140] = np.minimum(img[:, :140], 40)
    assert_circle_close(pp.find_fundus(img), circle, tol=2.5)


@pytest.mark.parametrize("img", [
    np.zeros((100, 150, 3), np.uint8),              # black
    np.full((100, 150, 3), 128, np.uint8),          # uniform grey
    disc_image(200, 200, Circle(100, 100, 30)),     # field of 7% of the image
    np.full((100, 100, 3), ORANGE, np.uint8),       # field fills the frame: no rim
], ids=["black", "uniform", "small", "full_frame"])
def test_find_fundus_none(img):
    assert pp.find_fundus(img) is None


def test_find_fundus_on_synthetic_captures():
    synthetic = pytest.importorskip("input_pipeline.synthetic")
    rng = np.random.default_rng(3)
    for wide, clipped, brightness in [(False, False, 1.0), (True, False, 1.0),
                                      (True, True, 1.0), (False, False, 0.25)]:
        img = synthetic.render_fundus(rng, 160, wide=wide, clipped=clipped,
                                      brightness=brightness)
        true = Circle(*synthetic.field_circle(160, wide=wide, clipped=clipped))
        assert_circle_close(pp.find_fundus(img), true, tol=3.0)


def test_fit_circle_exact_points():
    t = np.linspace(0, 2 * np.pi, 50, endpoint=False)
    pts = np.stack([12.5 + 7 * np.cos(t), -3 + 7 * np.sin(t)], axis=1)
    np.testing.assert_allclose(pp.fit_circle(pts), (12.5, -3, 7), atol=1e-9)


# --------------------------------------------------------------------------- crop


def test_crop_fundus_is_exact_bounding_square():
    img = np.arange(40 * 60 * 3, dtype=np.uint32).reshape(40, 60, 3).astype(np.uint8)
    out = pp.crop_fundus(img, Circle(30.0, 20.0, 10.0))
    # D = 20, x0 = 30 - 10, y0 = 20 - 10
    np.testing.assert_array_equal(out, img[10:30, 20:40])


def test_crop_fundus_pads_clipped_circle_with_zeros():
    circle = Circle(150, 100, 130)
    img = disc_image(200, 300, circle)
    out = pp.crop_fundus(img)
    assert out.shape == (260, 260, 3) and out.dtype == np.uint8
    assert not out[:28].any() and not out[-28:].any()  # rows above/below the frame
    np.testing.assert_array_equal(out[130, 130], ORANGE)
    # The field is centred: its columns are symmetric around the middle.
    cols = np.flatnonzero(out[130].any(axis=1))
    assert abs((cols[0] + cols[-1]) / 2 - 129.5) <= 1.5


def test_crop_fundus_square_and_centred_on_wide_capture():
    circle = Circle(170, 100, 80)
    out = pp.crop_fundus(disc_image(200, 300, circle))
    assert out.shape[0] == out.shape[1] and abs(out.shape[0] - 160) <= 3
    ys, xs = np.nonzero(out[..., 0])
    assert abs(xs.mean() - (out.shape[1] - 1) / 2) <= 1
    assert abs(ys.mean() - (out.shape[0] - 1) / 2) <= 1


def test_crop_fundus_raises_without_field():
    with pytest.raises(ImageError, match="no fundus field found"):
        pp.crop_fundus(np.zeros((50, 50, 3), np.uint8))


# --------------------------------------------------------------------------- pixel ops


def test_resize_down_is_area_average():
    img = np.array([[0, 2, 10, 10], [4, 6, 10, 10], [0, 0, 100, 100], [0, 0, 100, 100]],
                   np.uint8)
    img = np.repeat(img[..., None], 3, axis=2)
    np.testing.assert_array_equal(pp.resize(img, 2)[..., 0], [[3, 10], [0, 100]])


def test_resize_up_is_cubic_and_takes_height_width():
    img = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    out = pp.resize(img, (10, 14))
    assert out.shape == (10, 14, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.resize(img, (14, 10), interpolation=cv2.INTER_CUBIC))


def _low_contrast() -> np.ndarray:
    """uint8 RGB [64, 64, 3] with channels 100..115 ramps (different per channel)."""
    ramp = (100 + np.arange(64) // 4).astype(np.uint8)
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = ramp[None, :], ramp[:, None], 120
    return img


def test_clahe_green_changes_only_green():
    img = _low_contrast()
    out = pp.apply_clahe(img, "green", clip_limit=4.0, tile_grid=4)
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., [0, 2]], img[..., [0, 2]])
    assert np.ptp(out[..., 1]) > 1.5 * np.ptp(img[..., 1])  # 15 grey levels -> 26


def test_clahe_lab_keeps_gray_gray_and_raises_contrast():
    gray = np.repeat(_low_contrast()[..., 1:2], 3, axis=2)
    out = pp.apply_clahe(gray, "lab", clip_limit=4.0, tile_grid=4)
    assert out.shape == gray.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int)[..., 0] - out[..., 2]).max() <= 2  # no colour cast
    assert np.ptp(out[..., 1]) > 1.5 * np.ptp(gray[..., 1])
    with pytest.raises(ValueError, match="mode"):
        pp.apply_clahe(gray, "hsv")


def test_ben_graham_constant_is_128_inside_95_percent_mask():
    img = np.full((100, 100, 3), 90, np.uint8)
    out = pp.ben_graham(img, sigma=5)
    c = pp.centred_circle(100)  # centre 49.5, radius 50 -> mask radius 47.5
    assert out.dtype == np.uint8 and (out[50, 50] == 128).all()
    assert (out[49, 96] == 128).all()  # dx = 46.5, dy = 0.5: 46.50 px, inside
    assert (out[49, 2] == 0).all()     # dx = 47.5, dy = 0.5: 47.503 px, just outside
    assert not out[0, 0].any()               # corner
    assert (out[pp.circle_mask((100, 100), c, 0.95)] == 128).all()
    unmasked = pp.ben_graham(img, sigma=5, mask_field=False)
    assert (unmasked == 128).all()


def test_ben_graham_golden_edge():
    # 1-D step 0 -> 100; far from the step the blur equals the image (128), at the
    # step 4 * (100 - 50) + 128 saturates to 255 on the bright side.
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, 20:] = 100
    out = pp.ben_graham(img, sigma=2, mask_field=False)
    assert (out[:, :5] == 128).all() and (out[:, -5:] == 128).all()
    assert (out[:, 20] == 255).all() and (out[:, 19] == 0).all()


def test_quality_flags_dark_and_small():
    circle = Circle(100, 100, 90)
    dark = pp.quality_flags(disc_image(200, 200, circle, (12, 12, 12)), circle, scale=2)
    assert dark["too_dark"] and abs(dark["mean_brightness"] - 12) < 0.5
    assert not dark["small_field"] and dark["field_fraction"] == 0.9
    bright = pp.quality_flags(disc_image(200, 200, circle), circle, scale=4)
    assert not bright["too_dark"] and bright["field_diameter"] == 720
    small = Circle(100, 100, 40)
    flags = pp.quality_flags(disc_image(200, 200, small), small, scale=4)
    assert flags["small_field"] and flags["field_fraction"] == 0.4
    # big enough a fraction, but only 180 original pixels across (< 224)
    assert pp.quality_flags(disc_image(200, 200, circle), circle)["small_field"]


# --------------------------------------------------------------------------- pipeline


def test_process_image_wide_jpeg(tmp_path):
    circle = Circle(450, 300, 280)
    path = write_rgb(tmp_path / "wide.jpg", disc_image(600, 900, circle))
    img, info = pp.process_image(path, pp.PreprocessConfig(image_size=64))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert info["decode_scale"] == 8 and info["original_size"] == [600, 900]
    assert_circle_close(Circle(*info["circle"]), circle, tol=4)  # 1/2 px at 1/8 scale
    assert info["quality_too_dark"] is False and info["quality_small_field"] is False
    assert info["converted"] == ""
    assert np.abs(img[32, 32].astype(int) - ORANGE).max() <= 2  # JPEG
    assert img[1, 1].max() <= 2  # crop corner outside the field


def test_process_image_reduced_matches_full_decode(tmp_path):
    rng = np.random.default_rng(1)
    img = disc_image(600, 900, Circle(450, 300, 280))
    img = cv2.GaussianBlur(rng.integers(0, 255, img.shape, np.uint8), (0, 0), 6) // 2 + img // 2
    path = write_rgb(tmp_path / "tex.jpg", img)
    fast, _ = pp.process_image(path, pp.PreprocessConfig(image_size=128))
    slow, info = pp.process_image(path, pp.PreprocessConfig(image_size=128,
                                                            reduced_decode=False))
    assert info["decode_scale"] == 1
    assert np.abs(fast.astype(int) - slow).mean() < 3.0


def test_process_image_options_and_errors(tmp_path):
    path = write_rgb(tmp_path / "sq.png", disc_image(100, 100, Circle(50, 50, 45)))
    for config in (pp.PreprocessConfig(image_size=48, clahe="lab", ben_graham=True),
                   pp.PreprocessConfig(image_size=48, crop="none", clahe="green")):
        img, info = pp.process_image(path, config)
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    assert info["circle"] is None
    black = write_rgb(tmp_path / "black.png", np.zeros((50, 50, 3), np.uint8))
    with pytest.raises(ImageError, match="no fundus field found"):
        pp.process_image(black, pp.PreprocessConfig(image_size=32))


def test_encode_jpeg_round_trip():
    ramp = np.arange(32, dtype=np.uint8) * 4
    img = np.stack([ramp[None, :].repeat(32, 0), ramp[:, None].repeat(32, 1),
                    np.full((32, 32), 60, np.uint8)], axis=2)
    out = cv2.cvtColor(cv2.imdecode(np.frombuffer(pp.encode_jpeg(img), np.uint8), 1),
                       cv2.COLOR_BGR2RGB)
    assert out.shape == img.shape and np.abs(out.astype(int) - img).mean() < 1.5


def test_module_does_not_import_tensorflow():
    # prepare's spawned workers import this module; TensorFlow would cost each
    # of them seconds and hundreds of MB.
    code = ("import sys, input_pipeline.preprocessing; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parents[1],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- real data


def test_find_fundus_on_dark_mexican_images(shared_data):
    root = shared_data / "mexico_fundus"
    paths = [root / p for p in pd.read_csv(root / "labels.csv")["image"][:60]]
    images = sorted((pp.read_image(p) for p in paths), key=lambda im: im.mean())[:6]
    assert images[0].mean() < 20  # the darkest really are dark
    for img in images:
        circle = pp.find_fundus(img)
        assert circle is not None
        assert abs(circle.cx - 255.5) < 20 and abs(circle.cy - 255.5) < 20
        assert 220 < circle.r < 340

"""input_pipeline.preprocessing / image_decode: the one TF pre-processing of prepare and serving."""

import io
import struct
import zlib

import cv2
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from input_pipeline import image_decode, pipeline, synthetic
from input_pipeline import preprocessing as pp
from tests.serving_helpers import encode, garbage_scan, synthetic_fundus

ORANGE = (200, 90, 40)  # RGB, a typical fundus albedo
CFG = pp.PreprocessConfig(image_size=64, model_image_size=32)
FIND = tf.function(pp.find_fundus, input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
DECODE = tf.function(lambda b: image_decode.decode(b, 64),
                     input_signature=[tf.TensorSpec([], tf.string)])
PROCESS = pp.process_fn(CFG)


def disc_image(h: int, w: int, circle, color=ORANGE) -> np.ndarray:
    """uint8 RGB [h, w, 3]: black frame with a filled disc (clipped by the frame)."""
    img = np.zeros((h, w, 3), np.uint8)
    cv2.circle(img, (round(circle[0]), round(circle[1])), round(circle[2]), color, -1)
    return img


def png_header_only(width: int, height: int, depth: int = 8, color_type: int = 0) -> bytes:
    """A PNG whose header claims width x height (no pixel data): a decompression-bomb stand-in."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def decoded(data: bytes) -> dict:
    return {k: v.numpy() for k, v in DECODE(tf.constant(data)).items()}


def processed(data: bytes) -> dict:
    return {k: v.numpy() for k, v in PROCESS(tf.constant(data)).items()}


# --------------------------------------------------------------------------- decoding


def test_png_keeps_rgb_order_and_values():
    img = np.random.default_rng(0).integers(0, 256, (9, 7, 3)).astype(np.uint8)
    out = decoded(encode(img, ".png"))
    assert out["ok"] and out["conversions"] == b""
    np.testing.assert_array_equal(out["image"], img)


def test_16bit_gray_alpha_and_palette_conversions():
    gray16 = np.array([[0, 128, 129, 65535, 32896]], np.uint16)  # round(v / 257)
    out = decoded(cv2.imencode(".png", gray16)[1].tobytes())
    np.testing.assert_array_equal(out["image"][0, :, 0], [0, 0, 1, 255, 128])
    assert out["conversions"] == b"16bit->8bit;gray->rgb"
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [255, 255, 255, 0]]], np.uint8)
    out = decoded(cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))[1].tobytes())
    # colour * alpha / 255, rounded: 200 * 128 / 255 = 100.39 -> 100
    np.testing.assert_array_equal(out["image"][0], [[200, 100, 50], [100, 50, 25], [0, 0, 0]])
    assert out["conversions"] == b"alpha->black"
    palette = Image.new("P", (4, 2))
    palette.putpalette([10, 20, 30] * 256)
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    out = decoded(buf.getvalue())
    assert out["conversions"] == b"palette->rgb" and (out["image"] == [10, 20, 30]).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(orientation):
    img = np.zeros((30, 50, 3), np.uint8)
    img[:10, :20] = (250, 0, 0)  # a red block in the top-left corner
    img[20:, 40:] = (0, 0, 250)
    pil = Image.fromarray(img)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    out = decoded(buf.getvalue())
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    assert out["image"].shape == want.shape
    assert np.abs(out["image"].astype(int) - want).mean() < 2  # both libjpeg, IDCT may differ
    assert (out["conversions"] == b"exif_orientation") == (orientation != 1)
    assert list(out["original_size"]) == list(want.shape[:2])


def test_large_jpeg_uses_reduced_decode():
    data = encode(synthetic_fundus(1040, 1560, radius=500), ".jpg")
    out = image_decode.decode(tf.constant(data), 256)
    assert out["image"].shape == (260, 390, 3) and int(out["decode_scale"]) == 4
    assert image_decode.decode(tf.constant(data))["image"].shape == (1040, 1560, 3)


def test_every_bad_input_has_its_own_error():
    jpeg = encode(disc_image(64, 64, (32, 32, 28)), ".jpg")
    png = encode(disc_image(64, 64, (32, 32, 28)), ".png")
    tiff = cv2.imencode(".tiff", disc_image(64, 64, (32, 32, 28)))[1].tobytes()
    bad = {
        "empty": (b"", "empty image data"),
        "text": (b"patient_id,grade\n1,2\n" * 20, "not an image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "truncated JPEG"),
        "truncated_png": (png[: len(png) // 2], "truncated PNG"),
        "garbage_scan": (garbage_scan(jpeg), "corrupt JPEG data"),
        "bomb_144mp": (png_header_only(12_000, 12_000),
                       "image too large to decode safely (> 60 MP)"),
        # 59.3 MP, under the pixel cap, but 8 bytes per pixel decoded: refused from the header.
        "rgba16_7700": (png_header_only(7700, 7700, 16, 6),
                        "decoded image too large to decode safely (474 MB"),
        "tiff": (tiff, "unsupported format in the graph: TIFF"),
    }
    errors = {}
    for name, (data, want) in bad.items():
        out = decoded(data)
        errors[name] = out["error"].decode()
        assert not out["ok"] and want in errors[name], name
    assert len(set(errors.values())) == len(errors)


def test_graph_bytes_transcodes_tiff_losslessly():
    img16 = (np.arange(12 * 10 * 3).reshape(12, 10, 3) * 181).astype(np.uint16)
    data, note = pp.graph_bytes(cv2.imencode(".tiff", img16)[1].tobytes())
    assert note == "tiff->png"
    out = decoded(data)
    want = ((cv2.cvtColor(img16, cv2.COLOR_BGR2RGB).astype(int) + 128) // 257)
    np.testing.assert_array_equal(out["image"], want)
    assert pp.graph_bytes(b"\xff\xd8\xffabc") == (b"\xff\xd8\xffabc", "")
    with pytest.raises(pp.ImageError, match="not an image"):
        pp.graph_bytes(b"II*\x00 garbage")


# --------------------------------------------------------------------------- field detection


@pytest.mark.parametrize("h,w,circle", [
    (200, 200, (100, 96, 80)),      # square capture
    (200, 300, (149, 100, 92)),     # 3:2 with black side borders
    (200, 300, (150, 100, 130)),    # circle clipped by top and bottom of the frame
    (200, 300, (160, 110, 120)),    # clipped, off-centre
    (1200, 1800, (900, 600, 780)),  # large: detected at reduced size, scaled back
])
def test_find_fundus_geometry(h, w, circle):
    got, found = FIND(disc_image(h, w, circle))
    assert found
    np.testing.assert_allclose(got, circle, atol=max(1.5, 0.005 * circle[2]))


def test_find_fundus_on_synthetic_and_grey_framed_captures():
    rng = np.random.default_rng(3)
    for wide, clipped, brightness in [(False, False, 1.0), (True, True, 1.0),
                                      (False, False, 0.25)]:
        img = synthetic.render_fundus(rng, 160, wide=wide, clipped=clipped,
                                      brightness=brightness)
        got, found = FIND(img)
        assert found
        np.testing.assert_allclose(got, synthetic.field_circle(160, wide=wide, clipped=clipped),
                                   atol=3.0)
    # A bright field on a grey rectangle on black: only the Otsu retry finds the disc.
    img = np.zeros((240, 320, 3), np.uint8)
    img[30:210, 20:300] = 40
    cv2.circle(img, (200, 120), 85, (230, 160, 120), -1)
    img[:, :140] = np.minimum(img[:, :140], 40)
    got, found = FIND(img)
    assert found
    np.testing.assert_allclose(got, (200, 120, 85), atol=2.5)


def test_crop_is_exact_bounding_square_and_pads_clipped_fields():
    img = np.arange(40 * 60 * 3, dtype=np.uint32).reshape(40, 60, 3).astype(np.uint8)
    out = pp.crop_fundus(tf.constant(img), tf.constant([30.0, 20.0, 10.0], tf.float64))
    np.testing.assert_array_equal(out, img[10:30, 20:40])  # D = 20, x0 = 20, y0 = 10
    out = pp.crop_fundus(tf.constant(disc_image(200, 300, (150, 100, 130))),
                         tf.constant([150.0, 100.0, 130.0], tf.float64)).numpy()
    assert out.shape == (260, 260, 3) and not out[:28].any() and not out[-28:].any()


def test_median_blur_is_the_separable_median():
    img = np.random.default_rng(0).integers(0, 256, (23, 31)).astype(np.float32)
    padded = np.pad(img, 2, mode="edge")
    rows = np.median(np.stack([padded[:, j:j + 31] for j in range(5)]), axis=0)
    want = np.median(np.stack([rows[i:i + 23] for i in range(5)]), axis=0)
    np.testing.assert_array_equal(pp.median_blur(tf.constant(img)), want)


@pytest.mark.parametrize("seed", range(2))
def test_otsu_threshold_matches_opencv(seed):
    rng = np.random.default_rng(seed)
    gray = np.concatenate([rng.normal(40, 6, 500), rng.normal(150, 20, 300 + 200 * seed)])
    gray = np.clip(np.round(gray), 0, 255).astype(np.uint8).reshape(1, -1)
    want, _ = cv2.threshold(gray[gray > 20].reshape(1, -1), 0, 255,
                            cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    got = pp.otsu_threshold(tf.constant(gray, tf.float32), tf.constant(20.0, tf.float64))
    assert float(got) == want


# --------------------------------------------------------------------------- pixel ops


@pytest.mark.parametrize("size,tiles,clip", [(128, 8, 2.0), (100, 8, 2.0), (130, 6, 1.0),
                                             (64, 4, 0.0)])
def test_clahe_matches_opencv_exactly(size, tiles, clip):
    rng = np.random.default_rng(size)
    green = synthetic_fundus(size, size, radius=0.45 * size, seed=size)[..., 1]
    green = np.clip(green.astype(int) + rng.integers(-20, 20, green.shape), 0, 255)
    green = green.astype(np.uint8)
    want = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(green)
    np.testing.assert_array_equal(pp.clahe(tf.constant(green), clip, tiles), want)


def test_gaussian_blur_and_ben_graham():
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3)).astype(np.float32)
    want = cv2.GaussianBlur(img, (0, 0), 2.0)
    got = pp.gaussian_blur(tf.constant(img), pp.gaussian_kernel(2.0)).numpy()
    np.testing.assert_allclose(got, want, atol=0.5)  # OpenCV's float path: 8 sigma + 1 taps
    flat = pp.ben_graham(tf.fill([64, 64, 3], tf.constant(77, tf.uint8)), 3.0).numpy()
    assert (flat[32, 32] == 128).all() and (flat[0, 0] == 0).all()  # masked outside 95%


def test_resize_down_is_area_average():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, 2) * 10
    out = pp.resize(tf.constant(img), 2).numpy()
    np.testing.assert_array_equal(out[..., 0], [[25, 45], [105, 125]])


def test_lab_clahe_is_refused():
    with pytest.raises(ValueError, match="green-channel CLAHE only"):
        pp.PreprocessConfig.from_dataset_info(
            {"image_size": 256, "preprocessing": {"crop": "fundus", "clahe": "lab"}}, 224)
    config = pp.PreprocessConfig.from_dataset_info(
        {"image_size": 256, "preprocessing": {"crop": "none", "ben_graham": True,
                                               "jpeg_quality": 90},
         "quality_thresholds": {"dark_threshold": 12.0}}, 224)
    assert (config.crop, config.ben_graham, config.image_size, config.jpeg_quality,
            config.dark_threshold, config.model_image_size) == ("none", True, 256, 90, 12.0, 224)


# --------------------------------------------------------------------------- gradability


@pytest.mark.parametrize("name,img,reasons", [
    ("white", np.full((100, 100, 3), 255, np.uint8), "no_fundus_field"),
    ("black", np.zeros((100, 100, 3), np.uint8), "no_fundus_field;too_dark"),
    ("noise", np.random.default_rng(0).integers(0, 256, (300, 300, 3)).astype(np.uint8),
     "no_fundus_field"),
    ("1x1", np.full((1, 1, 3), 128, np.uint8), "no_fundus_field"),
    ("small_field", disc_image(300, 300, (150, 150, 60)), "small_field"),
    ("dark", disc_image(600, 600, (300, 300, 280), (12, 6, 3)), "too_dark"),
])
def test_ungradable_images(name, img, reasons):
    out = processed(encode(img, ".png"))
    assert out["ok"] and not out["gradable"], name
    assert out["quality"].decode().split(";")[:len(reasons.split(";"))] == reasons.split(";")
    assert out["image"].shape == (64, 64, 3)  # still cropped and resized for a prediction


def test_good_capture_is_gradable_and_circle_in_original_pixels():
    img = synthetic_fundus(600, 900, radius=280, centre=(460.3, 299.6))
    out = processed(encode(img, ".jpg"))
    assert out["ok"] and out["gradable"] and out["quality"] == b""
    assert int(out["decode_scale"]) == 8  # 600 / 8 = 75 >= 64
    np.testing.assert_allclose(out["circle"], (460.3, 299.6, 280), atol=4.0)


def test_rgba_with_white_transparent_border_equals_the_rgb_capture():
    rgb = synthetic_fundus(300, 450, radius=140, centre=(230.2, 149.7))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    border = (rgb == 0).all(axis=2)
    rgba[border] = (255, 255, 255, 0)  # white, fully transparent around the field
    want = processed(encode(rgb, ".png"))
    got = processed(cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))[1].tobytes())
    assert got["conversions"] == b"alpha->black"
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["circle"], want["circle"])


# --------------------------------------------------------------------------- prepare = serving


def _exif_rotated_jpeg(img: np.ndarray) -> bytes:
    """JPEG of img rotated 90 degrees clockwise, with EXIF orientation 8 undoing it."""
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(img, -1))).save(
        buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _rgba_white_border(img: np.ndarray) -> bytes:
    alpha = np.where((img == 0).all(axis=2), 0, 255).astype(np.uint8)
    rgba = np.dstack([img, alpha])
    rgba[alpha == 0] = (255, 255, 255, 0)
    return cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))[1].tobytes()


@pytest.mark.parametrize("kind", ["jpeg", "exif_rotated_jpeg", "rgba_white_border_png"])
def test_served_pixels_are_the_training_pixels(tmp_path, kind):
    # prepare stores process_image's JPEG; training decodes it with pipeline.decode and
    # pipeline.preprocess_image. The serving graph must produce those exact floats.
    img = synthetic.render_fundus(np.random.default_rng(0), 300, wide=True)
    data = {"jpeg": lambda: encode(img, ".jpg"),
            "exif_rotated_jpeg": lambda: _exif_rotated_jpeg(img),
            "rgba_white_border_png": lambda: _rgba_white_border(img)}[kind]()
    path = tmp_path / "x.img"
    path.write_bytes(data)
    _, info = pp.process_image(path, CFG)
    stored = pipeline.decode({"image_bytes": tf.constant(info["jpeg"])})["image"]
    training = pipeline.preprocess_image(stored, CFG.model_image_size).numpy()
    pixels, status = pp.serving_batch(tf.constant([data]), CFG)
    np.testing.assert_array_equal(pixels[0].numpy(), training)
    np.testing.assert_allclose(status["circle"][0], info["circle"], atol=0.05)
    assert bool(status["gradable"][0]) == info["gradable"] == True  # noqa: E712
    # The field is where it is in the upright photograph (EXIF applied, border black).
    np.testing.assert_allclose(info["circle"], synthetic.field_circle(300, wide=True), atol=3.0)


def test_one_bad_image_does_not_fail_the_batch():
    good = encode(synthetic_fundus(200, 300, radius=95), ".png")
    # Passes every header check (IHDR, IEND) but its zlib stream is garbage: the
    # PNG decoder raises, tf.data's ignore_errors turns that into ok=False.
    broken = bytearray(good)
    idat = broken.find(b"IDAT") + 4
    broken[idat:idat + 40] = b"\x00" * 40
    batch = tf.constant([good, bytes(broken), b"", good])
    pixels, status = pp.serving_batch(batch, CFG)
    assert status["ok"].numpy().tolist() == [True, False, False, True]
    assert status["error"][2].numpy() == b"empty image data (0 bytes)"
    assert b"could not decode" in status["error"][1].numpy()
    np.testing.assert_array_equal(pixels[0], pixels[3])
    mapped = next(iter(tf.data.Dataset.from_tensors(batch).map(
        lambda b: pp.serving_batch(b, CFG)[0])))
    np.testing.assert_array_equal(mapped, pixels)


# --------------------------------------------------------------------------- real data


def test_dark_mexican_images_are_found(shared_data):
    root = shared_data / "mexico_fundus"
    paths = [root / p for p in pd.read_csv(root / "labels.csv")["image"][:40]]
    outs = sorted((processed(p.read_bytes()) for p in paths),
                  key=lambda o: o["mean_brightness"])[:5]
    assert outs[0]["mean_brightness"] < 25  # the darkest really are dark
    for out in outs:
        cx, cy, r = out["circle"]
        assert out["field_found"] and abs(cx - 255.5) < 20 and abs(cy - 255.5) < 20
        assert 220 < r < 340


def test_garbage_scan_without_ff_bytes_is_corrupt_on_the_host():
    """Noise with no 0xFF byte keeps every marker: the structural walk passes it and TF
    only warns, but graph_bytes (prepare, predict) refuses it by libjpeg's strict mode."""
    jpeg = encode(synthetic_fundus(96, 96, radius=40, seed=3), ".jpg")
    data = bytearray(jpeg)
    start, end = data.index(b"\xff\xda") + 20, len(data) - 2
    mid = slice(start + (end - start) // 4, start + 3 * (end - start) // 4)
    data[mid] = np.random.default_rng(0).integers(0, 255, mid.stop - mid.start,
                                                  dtype=np.uint8).tobytes()
    assert decoded(bytes(data))["ok"]  # the in-graph check alone does not see it
    with pytest.raises(pp.ImageError, match="corrupt JPEG data"):
        pp.graph_bytes(bytes(data))
    assert pp.graph_bytes(jpeg) == (jpeg, "")  # a sound JPEG passes untouched

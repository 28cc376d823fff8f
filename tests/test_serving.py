"""input_pipeline.serving: the TF-graph twin of prepare's crop/resize/Ben Graham."""

import cv2
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import preprocessing, serving, synthetic
from tests.serving_helpers import encode, synthetic_fundus

SIZE = 128

# Centres sit off the half-pixel grid: a crop corner exactly at x.5 rounds
# either way, and a 1 px shift of a noisy texture alone costs ~2 grey levels.
CASES = {
    "square": lambda: synthetic_fundus(300, 300, radius=135, centre=(148.3, 151.2)),
    "wide_3x2": lambda: synthetic_fundus(300, 450, radius=140, centre=(230.2, 149.7)),
    "clipped_by_frame": lambda: synthetic_fundus(260, 390, radius=150, centre=(193.7, 129.2)),
    "dark": lambda: synthetic_fundus(300, 450, radius=135, centre=(224.2, 149.1),
                                     brightness=0.15),
    # The project's own generator: vessels, disc, lesions, vignetting.
    "rendered_wide_clipped": lambda: synthetic.render_fundus(
        np.random.default_rng(0), 300, wide=True, clipped=True),
    "rendered_wide_dark": lambda: synthetic.render_fundus(
        np.random.default_rng(1), 300, wide=True, brightness=0.35),
}


def _numpy_path(tmp_path, data: bytes, suffix: str, **config):
    """prepare's output (uint8 [S, S, 3]) and its circle, from a file of `data`."""
    path = tmp_path / f"img{suffix}"
    path.write_bytes(data)
    out, info = preprocessing.process_image(str(path), preprocessing.PreprocessConfig(
        image_size=SIZE, **config))
    return out, info["circle"]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_prepare_image_matches_numpy_path(tmp_path, name, suffix):
    data = encode(CASES[name](), suffix)
    h = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[0]
    want, circle = _numpy_path(tmp_path, data, suffix)
    image = serving.decode(tf.constant(data), SIZE)
    scale = h / image.shape[0]  # JPEGs decode at 1/2 here, as prepare decodes them
    got_circle = serving.find_fundus(image).numpy() * scale
    np.testing.assert_allclose(got_circle, circle, atol=2.0)  # crop box within 2 px
    config = serving.ServingConfig(dataset_image_size=SIZE, model_image_size=SIZE)
    got = serving.prepare_image(image, config).numpy()
    assert got.shape == want.shape == (SIZE, SIZE, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(float) - want).mean() < 3.0


def test_ben_graham_matches_numpy_path(tmp_path):
    data = encode(synthetic_fundus(300, 450, radius=140), ".png")
    want, _ = _numpy_path(tmp_path, data, ".png", ben_graham=True)
    config = serving.ServingConfig(dataset_image_size=SIZE, model_image_size=SIZE,
                                   ben_graham=True)
    got = serving.prepare_image(serving.decode(tf.constant(data), SIZE), config).numpy()
    # Ben Graham multiplies differences by 4, and a fraction of a pixel of crop
    # difference moves every vessel edge, hence a wider bound than without it.
    assert np.abs(got.astype(float) - want).mean() < 8.0
    assert (got[0, 0] == 0).all() and abs(float(np.median(got[SIZE // 2])) - 128) < 30


def test_no_crop_matches_numpy_path(tmp_path):
    data = encode(synthetic_fundus(200, 300, radius=95), ".png")
    want, circle = _numpy_path(tmp_path, data, ".png", crop="none")
    config = serving.ServingConfig(dataset_image_size=SIZE, model_image_size=SIZE, crop="none")
    got = serving.prepare_image(serving.decode(tf.constant(data), SIZE), config).numpy()
    assert circle is None and np.abs(got.astype(float) - want).mean() < 1.0


def test_gaussian_blur_matches_opencv():
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3)).astype(np.float32)
    want = cv2.GaussianBlur(img, (0, 0), 2.0)
    got = serving.gaussian_blur(tf.constant(img), serving.gaussian_kernel(2.0)).numpy()
    # OpenCV's float path uses 8 sigma + 1 taps; ours 6 sigma + 1 (its uint8 rule).
    np.testing.assert_allclose(got, want, atol=0.5)


def test_median_blur_matches_opencv():
    img = np.random.default_rng(0).integers(0, 256, (23, 31)).astype(np.uint8)
    img[:, :5] = 0  # a flat border region too
    got = serving.median_blur(tf.constant(img, tf.float32), 5).numpy()
    np.testing.assert_array_equal(got, cv2.medianBlur(img, 5))


def test_large_jpeg_uses_reduced_decode():
    data = encode(synthetic_fundus(1040, 1560, radius=500), ".jpg")
    image = serving.decode(tf.constant(data), 256)
    assert image.shape == (260, 390, 3)  # 1/4 scale keeps the short side >= 256
    assert serving.decode(tf.constant(data)).shape == (1040, 1560, 3)


@pytest.mark.parametrize("seed", range(4))
def test_otsu_threshold_matches_opencv(seed):
    rng = np.random.default_rng(seed)
    gray = np.concatenate([rng.normal(40, 6, 500), rng.normal(150, 20, 300 + 200 * seed)])
    gray = np.clip(np.round(gray), 0, 255).astype(np.uint8).reshape(1, -1)
    above = 20.0
    want, _ = cv2.threshold(gray[gray > above].reshape(1, -1), 0, 255,
                            cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    got = serving.otsu_threshold(tf.constant(gray, tf.float32), tf.constant(above, tf.float64))
    assert float(got) == want


def _grey_frame_capture() -> tuple[np.ndarray, tuple[float, float, float]]:
    """A bright field on a grey rectangle on black (screenshot-like), and its circle."""
    img = np.zeros((240, 320, 3), np.uint8)
    img[30:210, 20:300] = 40
    cv2.circle(img, (200, 120), 85, (230, 160, 120), -1)
    img[:, :140] = np.minimum(img[:, :140], 40)
    return img, (200.0, 120.0, 85.0)


def test_grey_frame_uses_otsu_retry_like_numpy():
    # The border threshold catches the grey rectangle; only the Otsu retry finds the disc.
    img, circle = _grey_frame_capture()
    want = preprocessing.find_fundus(img)
    got = serving.find_fundus(tf.constant(img)).numpy()
    np.testing.assert_allclose(got, [want.cx, want.cy, want.r], atol=1.0)
    np.testing.assert_allclose(got, circle, atol=2.5)


def test_black_image_falls_back_to_whole_frame():
    image = tf.zeros([60, 90, 3], tf.uint8)
    cx, cy, r = serving.find_fundus(image).numpy()
    assert (cx, cy) == pytest.approx((44.5, 29.5)) and r == pytest.approx(45.0)
    assert serving.crop_fundus(image).shape == (90, 90, 3)


def test_batch_in_dataset_map_equals_eager():
    imgs = [synthetic_fundus(200, 300, radius=95, seed=i) for i in range(2)]
    batch = tf.constant([encode(imgs[0], ".png"), encode(imgs[1], ".jpg")])
    config = serving.ServingConfig(dataset_image_size=96, model_image_size=64)
    eager = serving.preprocess_batch(batch, config).numpy()
    mapped = next(iter(tf.data.Dataset.from_tensors(batch).map(
        lambda b: serving.preprocess_batch(b, config)))).numpy()
    assert eager.shape == (2, 64, 64, 3) and eager.dtype == np.float32
    assert 0 <= eager.min() and eager.max() <= 255
    np.testing.assert_allclose(mapped, eager, atol=1e-3)


@pytest.mark.parametrize("size,tiles,clip", [
    (128, 8, 2.0), (100, 8, 2.0), (96, 8, 3.0), (130, 6, 1.0), (64, 8, 40.0), (64, 4, 0.0)])
def test_clahe_matches_opencv_exactly(size, tiles, clip):
    rng = np.random.default_rng(size)
    green = synthetic_fundus(size, size, radius=0.45 * size, seed=size)[..., 1]
    green = np.clip(green.astype(int) + rng.integers(-20, 20, green.shape), 0, 255)
    green = green.astype(np.uint8)
    want = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(green)
    got = serving.clahe(tf.constant(green), clip, tiles).numpy()
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_clahe_green_prepare_image_matches_numpy_path(tmp_path):
    data = encode(CASES["rendered_wide_clipped"](), ".png")
    want, _ = _numpy_path(tmp_path, data, ".png", clahe="green")
    plain, _ = _numpy_path(tmp_path, data, ".png")
    info = {"image_size": SIZE, "preprocessing": {"crop": "fundus", "clahe": "green",
                                                   "clahe_clip_limit": 2.0, "clahe_tile_grid": 8}}
    config = serving.ServingConfig.from_dataset_info(info, SIZE)
    got = serving.prepare_image(serving.decode(tf.constant(data), SIZE), config).numpy()
    assert np.abs(want.astype(float) - plain).mean() > 3.0  # CLAHE changes the image
    assert np.abs(got.astype(float) - want).mean() < 3.0


def test_lab_clahe_dataset_is_refused():
    info = {"image_size": 256, "preprocessing": {"crop": "fundus", "clahe": "lab"}}
    with pytest.raises(ValueError, match="green-channel CLAHE"):
        serving.ServingConfig.from_dataset_info(info, 224)
    config = serving.ServingConfig.from_dataset_info(
        {"image_size": 256, "preprocessing": {"crop": "none", "ben_graham": True}}, 224)
    assert (config.crop, config.ben_graham, config.dataset_image_size) == ("none", True, 256)
    assert config.clahe is None

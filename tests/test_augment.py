"""input_pipeline.augment: every op eagerly and inside Dataset.map, plus golden cases."""

import dataclasses
import math

import cv2
import gin
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import augment as aug

S = 48
SEED = (3, 7)


def _fundus(size: int = S) -> np.ndarray:
    """float32 [size, size, 3]: orange disc on black, a bright spot and a dark vessel."""
    img = np.zeros((size, size, 3), np.uint8)
    c = size // 2
    cv2.circle(img, (c, c), int(size * 0.47), (220, 110, 40), -1)
    cv2.circle(img, (int(size * 0.65), int(size * 0.4)), size // 8, (250, 220, 150), -1)
    cv2.line(img, (c, c), (int(size * 0.2), int(size * 0.8)), (120, 30, 20), 2)
    return img.astype(np.float32)


OPS = {
        "affine": lambda x, s: aug.random_affine(x, aug.AugmentConfig(shear_degrees=10), s),
        "hflip": lambda x, s: aug.random_flip(x, s, horizontal=True),
        "vflip": lambda x, s: aug.random_flip(x, s, horizontal=False),
        "brightness": lambda x, s: aug.random_brightness(x, s, 0.3),
        "contrast": lambda x, s: aug.random_contrast(x, s, 0.3),
        "saturation": lambda x, s: aug.random_saturation(x, s, 0.5),
        "hue": lambda x, s: aug.random_hue(x, s, 0.1),
        "sharpness": lambda x, s: aug.random_sharpness(x, s, 0.9),
        "blur": lambda x, s: aug.random_blur(x, s, prob=1.0),
        "erase": lambda x, s: aug.random_erasing(x, s, prob=1.0),
        "randaugment": lambda x, s: aug.randaugment(x, s, layers=2, magnitude=9),
        "augment_default": lambda x, s: aug.augment(x, aug.AugmentConfig(), s),
        "augment_full": lambda x, s: aug.augment(x, aug.full_config(), s),
        "augment_no_geometry": lambda x, s: aug.augment(
                x, aug.full_config(rotation_degrees=0, scale_range=(1.0, 1.0), translate=0,
                                   shear_degrees=0, randaugment_layers=0), s),
}


def _seed(a: int, b: int = 0) -> tf.Tensor:
    return tf.constant([a, b], tf.int64)


def _in_map(fn, image: np.ndarray, seed) -> np.ndarray:
    ds = tf.data.Dataset.from_tensors((image, seed)).map(fn)
    return next(iter(ds)).numpy()


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_contract_eager_and_in_map(name):
    fn, image = OPS[name], _fundus()
    eager = fn(tf.constant(image), _seed(*SEED)).numpy()
    mapped = _in_map(fn, image, _seed(*SEED))
    assert eager.shape == (S, S, 3) and eager.dtype == np.float32
    assert eager.min() >= 0.0 and eager.max() <= 255.0
    np.testing.assert_allclose(mapped, eager, atol=1e-3)  # graph == eager, same seed
    np.testing.assert_array_equal(fn(tf.constant(image), _seed(*SEED)).numpy(), eager)
    others = [fn(tf.constant(image), _seed(s, 1)).numpy() for s in range(6)]
    assert any(np.abs(o - eager).max() > 1.0 for o in others), "seed has no effect"


@pytest.mark.parametrize("seed", range(6))
def test_fundus_aware_corners_black_and_field_in_frame(seed):
    out = aug.augment(tf.constant(_fundus()), aug.full_config(brightness=0.5), _seed(seed))
    out = out.numpy()
    y, x = np.mgrid[:S, :S]
    radius = 0.98 * S / 2
    outside = (x - (S - 1) / 2) ** 2 + (y - (S - 1) / 2) ** 2 > radius**2
    assert np.all(out[outside] == 0.0)
    assert out[~outside].mean() > 30  # the field is still there


def test_fundus_aware_affine_keeps_the_field_inside_the_frame():
    # A disc filling the inscribed circle: with zoom capped at 1 and the shift
    # bounded by (1 - scale) * S / 2, nothing of it may leave the circle.
    disc = np.zeros((S, S, 3), np.float32)
    cv2.circle(disc, (S // 2, S // 2), S // 2 - 2, (200, 200, 200), -1)
    config = aug.AugmentConfig(scale_range=(0.6, 1.4), translate=0.3, rotation_degrees=180)
    y, x = np.mgrid[:S, :S]
    outside = (x - (S - 1) / 2) ** 2 + (y - (S - 1) / 2) ** 2 > (S / 2 + 1) ** 2
    for seed in range(10):
        out = aug.random_affine(tf.constant(disc), config, _seed(seed)).numpy()
        assert out[outside].max() < 1.0


def test_affine_rotation_by_90_degrees_is_exact():
    image = _fundus()
    matrix = aug.affine_matrix(float(S), float(S), angle=math.pi / 2)
    out = aug.apply_affine(tf.constant(image), matrix).numpy()
    # x right, y down: a positive angle turns the picture clockwise.
    np.testing.assert_allclose(out, np.rot90(image, k=-1), atol=1e-2)


def test_flips_ride_in_the_affine_matrix():
    image = _fundus()
    config = aug.AugmentConfig(rotation_degrees=0, scale_range=(1.0, 1.0), translate=0,
                               hflip=True, vflip=False, fundus_aware=False)
    seen = set()
    for seed in range(8):
        out = aug.random_affine(tf.constant(image), config, _seed(seed)).numpy()
        if np.allclose(out, image, atol=1e-3):
            seen.add("same")
        else:
            np.testing.assert_allclose(out, image[:, ::-1], atol=1e-3)
            seen.add("flipped")
    assert seen == {"same", "flipped"}


def test_fused_colour_jitter_equals_the_chain_without_clipping():
    image = np.random.default_rng(0).uniform(90, 160, (S, S, 3)).astype(np.float32)
    x = tf.constant(image)
    b, s, h, c = 1.1, 0.8, 0.03, 0.9
    fused = aug.colour_jitter(x, brightness=b, saturation=s, hue=h, contrast=c).numpy()
    chain = aug.adjust_brightness(x, b)
    chain = aug.adjust_contrast(aug.adjust_hue(aug.adjust_saturation(chain, s), h), c).numpy()
    np.testing.assert_allclose(fused, chain, atol=0.05)


def test_colour_ops_golden_values():
    x = tf.constant([[[100.0, 50.0, 200.0]]])
    np.testing.assert_allclose(aug.adjust_brightness(x, 2.0).numpy(), [[[200, 100, 255]]])
    gray = 0.299 * 100 + 0.587 * 50 + 0.114 * 200
    np.testing.assert_allclose(aug.adjust_saturation(x, 0.0).numpy(), [[[gray] * 3]], rtol=1e-5)
    np.testing.assert_allclose(aug.adjust_hue(x, 0.0).numpy(), x.numpy(), atol=1e-3)
    np.testing.assert_allclose(aug.adjust_hue(x, 1.0).numpy(), x.numpy(), atol=1e-2)
    np.testing.assert_allclose(aug.posterize(x, 2).numpy(), [[[64, 0, 192]]])
    np.testing.assert_allclose(aug.solarize(x, 128.0).numpy(), [[[100, 50, 55]]])


def test_hue_keeps_luma_and_changes_colour():
    x = tf.constant(np.random.default_rng(1).uniform(60, 190, (S, S, 3)).astype(np.float32))
    out = aug.adjust_hue(x, 0.05)  # mid-range values: no clipping
    luma = lambda im: tf.tensordot(im, tf.constant([0.299, 0.587, 0.114]), 1).numpy()
    np.testing.assert_allclose(luma(out), luma(x), atol=0.05)
    assert np.abs(out.numpy() - x.numpy()).mean() > 2.0


def test_sharpness_and_blur_neutral_settings():
    x = tf.constant(_fundus())
    np.testing.assert_allclose(aug.adjust_sharpness(x, 1.0).numpy(), x.numpy(), atol=1e-3)
    blurred = aug.gaussian_blur(x, 1.5).numpy()
    assert blurred.std() < x.numpy().std()  # smoothing lowers the variance
    np.testing.assert_allclose(blurred.mean(), x.numpy().mean(), rtol=0.05)


def test_random_erase_zeroes_one_rectangle_of_the_requested_area():
    x = tf.fill([S, S, 3], 100.0)
    for seed in range(5):
        out = aug.random_erase(x, _seed(seed), area=(0.1, 0.2)).numpy()
        zero = out[..., 0] == 0
        rows, cols = np.nonzero(zero)
        assert zero.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # a full rectangle
        assert 0.06 * S * S <= zero.sum() <= 0.25 * S * S


def test_disabled_ops_are_not_in_the_graph_and_identity_config_is_identity():
    off = aug.AugmentConfig(rotation_degrees=0, scale_range=(1.0, 1.0), translate=0,
                            hflip=False, vflip=False, brightness=0, contrast=0, saturation=0,
                            hue=0, fundus_aware=False)
    assert not off.geometric()
    x = tf.constant(_fundus())
    np.testing.assert_array_equal(aug.augment(x, off, _seed(1)).numpy(), x.numpy())
    graph = tf.function(lambda im: aug.augment(im, off, _seed(1))).get_concrete_function(
            tf.TensorSpec([S, S, 3], tf.float32)).graph
    assert not any(op.type == "ImageProjectiveTransformV3" for op in graph.get_operations())


def test_enabling_one_op_does_not_change_what_the_others_draw():
    x = tf.constant(_fundus())
    base = aug.AugmentConfig(fundus_aware=False)
    with_blur = dataclasses.replace(base, blur_prob=1.0, blur_sigma=(0.01, 0.02))
    a = aug.augment(x, base, _seed(5)).numpy()
    b = aug.augment(x, with_blur, _seed(5)).numpy()
    np.testing.assert_allclose(a, b, atol=0.5)  # a ~zero-sigma blur, same draws elsewhere


def test_augment_config_is_gin_configurable():
    try:
        gin.parse_config(["AugmentConfig.hue = 0.0", "AugmentConfig.randaugment_layers = 3"])
        config = aug.AugmentConfig()
        assert config.hue == 0.0 and config.randaugment_layers == 3
    finally:
        gin.clear_config()
    assert aug.AugmentConfig().hue == 0.02


def test_fundus_mask_follows_the_transformed_field():
    # A photo filling the whole square, zoomed out to 0.7 and turned 45 degrees:
    # without the transformed-circle mask the rotated square's edges would show.
    square = tf.fill([64, 64, 3], 200.0)
    config = aug.AugmentConfig(scale_range=(0.7, 0.7), rotation_degrees=45, translate=0,
                               brightness=0, contrast=0, saturation=0, hue=0)
    out = aug.augment(square, config, _seed(1)).numpy()
    field = out[..., 0] > 0
    assert field.sum() == pytest.approx(math.pi * (0.7 * 0.98 * 32) ** 2, rel=0.02)
    y, x = np.nonzero(field)
    radius = np.sqrt((x - 31.5) ** 2 + (y - 31.5) ** 2)
    assert radius.max() <= 0.7 * 0.98 * 32 + 1  # a disc, not a rotated square

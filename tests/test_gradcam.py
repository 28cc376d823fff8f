"""evaluation.gradcam: golden map on a hand-built model, every registered backbone, and a
tiny trained model whose CAM finds the quadrant holding the lesions."""

import keras
import numpy as np
import pytest
from PIL import Image

from evaluation import gradcam
from input_pipeline.synthetic import render_fundus
from models.registry import build_model, list_models


def _identity_backbone_model(size=4):
    """image -> backbone (identity: the "conv map" is the image) -> gap -> dropout -> Dense.

    With logits = mean(R channel): d score / d A_c = [1, 0, 0] / (H W) at every pixel, so the
    Grad-CAM is ReLU(R) / (H W), i.e. R / max(R) after normalisation.
    """
    pixels = keras.Input((size, size, 3))
    backbone = keras.Model(pixels, keras.layers.Rescaling(1.0)(pixels), name="backbone")
    image = keras.Input((size, size, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(backbone(image))
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    dense = keras.layers.Dense(1, name="logits")
    model = keras.Model(image, dense(x))
    dense.set_weights([np.array([[1.0], [0.0], [0.0]]), np.zeros(1)])
    return model


def test_golden_map_on_hand_built_model():
    model = _identity_backbone_model()
    img = np.zeros((1, 4, 4, 3), np.float32)
    img[0, :, :, 0] = np.arange(16).reshape(4, 4)
    img[0, :, :, 1] = 99.0  # ignored: its channel weight is 0
    cam = gradcam.gradcam(model, img, target=0)
    np.testing.assert_allclose(cam[0], np.arange(16).reshape(4, 4) / 15.0, atol=1e-6)
    assert cam.dtype == np.float32
    # A negative gradient direction gives an all-zero (not NaN) map.
    flat = gradcam.gradcam(model, img, score_fn=lambda logits: -logits[:, 0])
    np.testing.assert_array_equal(flat, 0.0)


def test_rejects_model_with_extra_layers():
    model = _identity_backbone_model()
    wrapped = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Rescaling(2.0), model])
    with pytest.raises(ValueError, match="Grad-CAM expects layers"):
        gradcam.cam_model(wrapped)


@pytest.mark.parametrize("name", list_models())
def test_every_backbone_gives_finite_map_of_input_size(name):
    model = build_model(name, "dr_grade", num_classes=3, image_size=32, weights=None)
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    _, logits = gradcam.cam_model(model)(x, training=False)
    np.testing.assert_allclose(logits, model(x, training=False), rtol=1e-5, atol=1e-5)
    cam = gradcam.gradcam(model, x, target=1)  # coral: "grade >= 2"
    assert cam.shape == (1, 32, 32) and np.isfinite(cam).all()
    assert cam.min() >= 0.0 and cam.max() <= 1.0


def test_expected_grade_score():
    logits = np.array([[10.0, -10.0], [10.0, 10.0]], np.float32)  # coral: grade 1 and grade 2
    score = np.asarray(gradcam.expected_grade_score("coral")(keras.ops.convert_to_tensor(logits)))
    np.testing.assert_allclose(score, [1.0, 2.0], atol=1e-3)


def test_overlay_and_png(tmp_path):
    image = np.full((2, 2, 3), 100, np.uint8)
    out = gradcam.overlay(image, np.array([[0.0, 1.0], [0.0, 1.0]]), alpha=0.4)
    # jet(0) = (0, 0, 0.5), jet(1) = (0.5, 0, 0): 0.6 * 100 + 0.4 * 127.5 = 111.
    np.testing.assert_array_equal(out[0, 0], [60, 60, 111])
    np.testing.assert_array_equal(out[0, 1], [111, 60, 60])
    path = gradcam.save_png(tmp_path / "a" / "cam.png", out)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), out)


# ------------------------------------------------------------------- trained localisation

SIZE = 96


def _lesion_set(rng, n):
    """Every other image has 6 haemorrhages in a random quadrant; the rest have no lesion."""
    images, labels, quadrants = [], [], []
    for i in range(n):
        quadrant = int(rng.integers(4))
        positive = i % 2 == 0
        lesions = {"haemorrhages": 6, "quadrant": quadrant} if positive else None
        images.append(render_fundus(rng, SIZE, lesions=lesions))
        labels.append(int(positive))
        quadrants.append(quadrant if positive else -1)
    return np.stack(images).astype(np.float32), np.array(labels), np.array(quadrants)


def _quadrant_fraction(cam, quadrant):
    """Share of the CAM's mass in quadrant 0..3 (top-left, top-right, bottom-left, bottom-right)."""
    h, w = cam.shape[0] // 2, cam.shape[1] // 2
    parts = [cam[:h, :w], cam[:h, w:], cam[h:, :w], cam[h:, w:]]
    return parts[quadrant].sum() / max(cam.sum(), 1e-9)


@pytest.mark.slow
def test_trained_model_cam_finds_lesion_quadrant():
    rng = np.random.default_rng(0)
    x_train, y_train, _ = _lesion_set(rng, 200)
    x_test, y_test, q_test = _lesion_set(rng, 24)
    keras.utils.set_random_seed(0)
    # Two stride-2 blocks: a 6x6 map at 96 px, fine enough to tell quadrants apart.
    model = build_model("resnetv2_lite", "binary", 2, SIZE, widths=(16, 32))
    for layer in model.get_layer("backbone").layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5  # moving statistics that are usable after only 70 steps
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)])
    model.fit(x_train, y_train[:, None].astype(np.float32), batch_size=32, epochs=10, verbose=0)
    accuracy = model.evaluate(x_test, y_test[:, None].astype(np.float32), verbose=0)[1]
    assert accuracy >= 0.75  # the model must have learnt the lesions for the CAM to mean much

    positive = y_test == 1
    cams = gradcam.gradcam(model, x_test[positive], target=0)
    fractions = np.array([_quadrant_fraction(c, q) for c, q in zip(cams, q_test[positive],
                                                                    strict=True)])
    # Chance is 0.25 per quadrant; most positive images put most of the mass on the lesions.
    assert np.mean(fractions > 0.5) >= 2 / 3, fractions.round(2)

"""Losses (models/losses.py): numpy goldens, ~0 when perfect, serialisation, jit fit."""

import keras
import numpy as np
import pytest
from keras import ops

from models import heads, losses

# 3 examples x 3 labels / classes / ranks, shared by the golden-value tests.
Y_MULTI = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]], "float32")
LOGITS = np.array([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7], [-0.2, 2.5, 1.0]], "float32")
Y_SPARSE = np.array([0, 1, 2], "int32")
Y_GRADE = np.array([0, 2, 3], "int32")  # K = 4 grades -> 3 ordinal logits


def _np(x):
    return ops.convert_to_numpy(x)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x.astype("float64")))


def _log_softmax(x):
    x = x.astype("float64")
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- literal goldens


def test_literal_goldens():
    # One element, logit 0 (p = 0.5), y = 1: alpha (1 - p)^2 log 2 = 0.25 * 0.25 * 0.693147.
    value = losses.BinaryFocalLoss()(np.array([[1.0]]), np.array([[0.0]]))
    np.testing.assert_allclose(_np(value), 0.0433217, rtol=1e-5)
    # Uniform logits over 3 classes: CE = log 3.
    value = losses.WeightedCrossentropy()(np.array([2]), np.zeros((1, 3)))
    np.testing.assert_allclose(_np(value), 1.0986123, rtol=1e-6)
    # CORAL with all-zero logits: each of the K-1 = 2 tasks costs log 2, whatever the grade.
    value = losses.CoralLoss()(np.array([0, 1, 2]), np.zeros((3, 2)))
    np.testing.assert_allclose(_np(value), 2 * np.log(2), rtol=1e-6)
    # CORN with all-zero logits: the mean over used entries is log 2.
    value = losses.CornLoss()(np.array([0, 1, 2]), np.zeros((3, 2)))
    np.testing.assert_allclose(_np(value), np.log(2), rtol=1e-6)
    # ASL, one negative with p = 0.5: p_m = 0.45 -> -(0.45^4) log(0.55) = 0.0245.
    value = losses.AsymmetricLoss()(np.array([[0.0]]), np.array([[0.0]]))
    np.testing.assert_allclose(_np(value), -(0.45**4) * np.log(0.55), rtol=1e-5)


# ----------------------------------------------------------------------------- 3x3 goldens


def test_binary_focal_golden():
    y, p = Y_MULTI.astype("float64"), _sig(LOGITS)
    p_t = np.where(y == 1, p, 1 - p)
    alpha_t = np.where(y == 1, 0.15, 0.85)
    per_label = -alpha_t * (1 - p_t) ** 2.5 * np.log(p_t)
    for how, reduce in (("mean", np.mean), ("sum", np.sum)):
        loss = losses.BinaryFocalLoss(gamma=2.5, alpha=0.15, reduction_over_labels=how)
        np.testing.assert_allclose(_np(loss(Y_MULTI, LOGITS)), reduce(per_label, -1).mean(), 1e-5)
    # "mean" equals Keras' built-in with class balancing.
    builtin = keras.losses.BinaryFocalCrossentropy(
        apply_class_balancing=True, alpha=0.15, gamma=2.5, from_logits=True
    )
    np.testing.assert_allclose(
        _np(losses.BinaryFocalLoss(gamma=2.5, alpha=0.15)(Y_MULTI, LOGITS)),
        _np(builtin(Y_MULTI, LOGITS)),
        rtol=1e-5,
    )


def test_binary_focal_without_focusing_is_bce():
    loss = losses.BinaryFocalLoss(gamma=0.0, alpha=None)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    np.testing.assert_allclose(_np(loss(Y_MULTI, LOGITS)), _np(bce(Y_MULTI, LOGITS)), rtol=1e-5)


def test_binary_labels_1d_match_column():
    y, x = np.array([1, 0, 1], "int32"), np.array([[0.3], [-2.0], [4.0]], "float32")
    for loss in (losses.BinaryFocalLoss(), losses.WeightedBinaryCrossentropy(pos_weight=2.0)):
        np.testing.assert_allclose(
            _np(loss(y, x)), _np(loss(y[:, None].astype("float32"), x)), rtol=1e-6
        )


def test_asymmetric_golden():
    y, p = Y_MULTI.astype("float64"), _sig(LOGITS)
    p_m = np.maximum(p - 0.05, 0)
    per_label = -(y * (1 - p) ** 1 * np.log(p) + (1 - y) * p_m**4 * np.log(1 - p_m))
    expected = per_label.sum(-1).mean()
    np.testing.assert_allclose(_np(losses.AsymmetricLoss()(Y_MULTI, LOGITS)), expected, rtol=1e-5)
    # Without the clip: p_m = p.
    per_label = -(y * (1 - p) ** 2 * np.log(p) + (1 - y) * p**3 * np.log(1 - p))
    loss = losses.AsymmetricLoss(gamma_neg=3, gamma_pos=2, clip=0.0)
    np.testing.assert_allclose(_np(loss(Y_MULTI, LOGITS)), per_label.sum(-1).mean(), rtol=1e-5)


def test_weighted_bce_golden():
    y, p = Y_MULTI.astype("float64"), _sig(LOGITS)
    w = np.array([1.0, 2.0, 3.0])
    per_label = -(w * y * np.log(p) + (1 - y) * np.log(1 - p))
    loss = losses.WeightedBinaryCrossentropy(pos_weight=w)
    np.testing.assert_allclose(_np(loss(Y_MULTI, LOGITS)), per_label.mean(-1).mean(), rtol=1e-5)
    loss = losses.WeightedBinaryCrossentropy(pos_weight=w, reduction_over_labels="sum")
    np.testing.assert_allclose(_np(loss(Y_MULTI, LOGITS)), per_label.sum(-1).mean(), rtol=1e-5)


def test_pos_weight_from_counts():
    np.testing.assert_allclose(
        losses.pos_weight_from_counts(100, [10, 50, 0, 5]), [9.0, 1.0, 10.0, 10.0]
    )
    np.testing.assert_allclose(losses.pos_weight_from_counts(100, [5], clamp=30.0), [19.0])


def test_categorical_focal_golden():
    log_p = _log_softmax(LOGITS)[np.arange(3), Y_SPARSE]
    alpha = np.array([0.5, 1.0, 2.0])
    expected = (-alpha[Y_SPARSE] * (1 - np.exp(log_p)) ** 2 * log_p).mean()
    loss = losses.CategoricalFocalLoss(gamma=2.0, alpha=alpha)
    np.testing.assert_allclose(_np(loss(Y_SPARSE, LOGITS)), expected, rtol=1e-5)
    plain = losses.CategoricalFocalLoss(gamma=0.0)
    np.testing.assert_allclose(_np(plain(Y_SPARSE, LOGITS)), -log_p.mean(), rtol=1e-5)


def test_weighted_crossentropy_golden():
    w, eps = np.array([1.0, 2.0, 0.5]), 0.1
    q = np.eye(3)[Y_SPARSE] * (1 - eps) + eps / 3
    expected = (-w[Y_SPARSE] * (q * _log_softmax(LOGITS)).sum(-1)).mean()
    loss = losses.WeightedCrossentropy(class_weights=w, label_smoothing=eps)
    np.testing.assert_allclose(_np(loss(Y_SPARSE, LOGITS)), expected, rtol=1e-5)
    # No weights, no smoothing: Keras' sparse CE.
    builtin = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    np.testing.assert_allclose(
        _np(losses.WeightedCrossentropy()(Y_SPARSE, LOGITS)),
        _np(builtin(Y_SPARSE, LOGITS)),
        rtol=1e-5,
    )


def test_coral_golden():
    levels = (Y_GRADE[:, None] > np.arange(3)).astype("float64")  # [[0,0,0],[1,1,0],[1,1,1]]
    p = _sig(LOGITS)
    lam = np.array([1.0, 0.5, 2.0])
    expected = (-(lam * (levels * np.log(p) + (1 - levels) * np.log(1 - p))).sum(-1)).mean()
    loss = losses.CoralLoss(importance_weights=lam)
    np.testing.assert_allclose(_np(loss(Y_GRADE, LOGITS)), expected, rtol=1e-5)


def _corn_reference(y, logits):
    """Loop over conditional training subsets, as in coral_pytorch's corn_loss."""
    total, used = 0.0, 0
    for k in range(logits.shape[1]):
        subset = y > k - 1
        target = (y[subset] > k).astype("float64")
        p = _sig(logits[subset, k])
        total += -(target * np.log(p) + (1 - target) * np.log(1 - p)).sum()
        used += subset.sum()
    return total / used


def test_corn_golden():
    np.testing.assert_allclose(
        _np(losses.CornLoss()(Y_GRADE, LOGITS)), _corn_reference(Y_GRADE, LOGITS), rtol=1e-5
    )
    rng = np.random.default_rng(1)
    y, logits = rng.integers(0, 5, 16), rng.normal(size=(16, 4)).astype("float32")
    np.testing.assert_allclose(
        _np(losses.CornLoss()(y, logits)), _corn_reference(y, logits), rtol=1e-5
    )


# ----------------------------------------------------------------------------- perfect predictions

BIG = 30.0


def _perfect_cases():
    ordinal = np.where(Y_GRADE[:, None] > np.arange(3), BIG, -BIG).astype("float32")
    onehot_logits = np.where(np.eye(3)[Y_SPARSE] == 1, BIG, -BIG).astype("float32")
    multi_logits = np.where(Y_MULTI == 1, BIG, -BIG).astype("float32")
    return [
        (losses.BinaryFocalLoss(), Y_MULTI, multi_logits),
        (losses.AsymmetricLoss(), Y_MULTI, multi_logits),
        (losses.WeightedBinaryCrossentropy(pos_weight=[1.0, 5.0, 10.0]), Y_MULTI, multi_logits),
        (losses.CategoricalFocalLoss(), Y_SPARSE, onehot_logits),
        (losses.WeightedCrossentropy(class_weights=[1.0, 2.0, 3.0]), Y_SPARSE, onehot_logits),
        (losses.CoralLoss(), Y_GRADE, ordinal),
        (losses.CornLoss(), Y_GRADE, ordinal),
    ]


@pytest.mark.parametrize("loss,y,logits", _perfect_cases(), ids=lambda v: getattr(v, "name", ""))
def test_perfect_prediction_is_zero(loss, y, logits):
    value = float(_np(loss(y, logits)))
    assert 0.0 <= value < 1e-6
    # ... and a confidently wrong one is large.
    assert float(_np(loss(y, -logits))) > 1.0


def test_sample_weight_and_label_smoothing_floor():
    loss = losses.CoralLoss()
    per_example = _np(losses.coral_loss(Y_GRADE, LOGITS))
    weighted = loss(Y_GRADE, LOGITS, sample_weight=np.array([1.0, 0.0, 2.0]))
    np.testing.assert_allclose(_np(weighted), (per_example[0] + 2 * per_example[2]) / 3, 1e-5)
    # With smoothing even a perfect prediction pays: the loss never reaches 0.
    smooth = losses.WeightedCrossentropy(label_smoothing=0.1)
    assert float(_np(smooth(Y_SPARSE, np.eye(3, dtype="float32")[Y_SPARSE] * BIG))) > 0.5


# ----------------------------------------------------------------------------- serialisation

CONFIGURED = [
    losses.BinaryFocalLoss(gamma=2.5, alpha=0.15, reduction_over_labels="sum"),
    losses.CategoricalFocalLoss(gamma=1.0, alpha=[0.2, 0.3, 0.5]),
    losses.AsymmetricLoss(gamma_neg=2.0, gamma_pos=0.0, clip=0.1),
    losses.WeightedBinaryCrossentropy(pos_weight=np.array([1.0, 2.0, 3.0], "float32")),
    losses.CoralLoss(importance_weights=[1.0, 0.5, 2.0]),
    losses.CornLoss(),
    losses.WeightedCrossentropy(class_weights=[1.0, 2.0, 0.5], label_smoothing=0.1),
]
IDS = [type(loss).__name__ for loss in CONFIGURED]


def _inputs_for(loss):
    if isinstance(loss, (losses.CoralLoss, losses.CornLoss)):
        return Y_GRADE, LOGITS
    if isinstance(loss, (losses.CategoricalFocalLoss, losses.WeightedCrossentropy)):
        return Y_SPARSE, LOGITS
    return Y_MULTI, LOGITS


@pytest.mark.parametrize("loss", CONFIGURED, ids=IDS)
def test_serialize_round_trip(loss):
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    y, x = _inputs_for(loss)
    np.testing.assert_allclose(_np(restored(y, x)), _np(loss(y, x)), rtol=1e-6)


@pytest.mark.parametrize("loss", CONFIGURED, ids=IDS)
def test_saved_model_keeps_compiled_loss(tmp_path, loss):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(inputs))
    model.compile(optimizer="sgd", loss=loss)
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.saving.load_model(path).loss
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()


# ----------------------------------------------------------------------------- factory + fit

FACTORY = [
    ("binary", "sigmoid", "focal", losses.BinaryFocalLoss),
    ("binary", "softmax", "ce", losses.WeightedCrossentropy),
    ("multiclass", None, "focal", losses.CategoricalFocalLoss),
    ("multilabel", None, "asl", losses.AsymmetricLoss),
    ("multilabel", None, None, losses.WeightedBinaryCrossentropy),
    ("dr_grade", None, None, losses.CoralLoss),
    ("dr_grade", "corn", "corn", losses.CornLoss),
    ("dr_grade", "softmax", "ce", losses.WeightedCrossentropy),
]


def test_get_loss_factory():
    for task, head, name, cls in FACTORY:
        assert type(losses.get_loss(name, task, head)) is cls
    focal = losses.get_loss("focal", "multilabel", gamma=2.5, alpha=0.15)
    assert focal.get_config()["gamma"] == 2.5
    with pytest.raises(ValueError, match="does not fit.*'coral'"):
        losses.get_loss("corn", "dr_grade")
    with pytest.raises(ValueError, match="does not fit"):
        losses.get_loss("asl", "multiclass")


@pytest.mark.parametrize("task,head,name,cls", FACTORY, ids=[f"{t}-{n}" for t, _, n, _ in FACTORY])
def test_loss_trains_jit(task, head, name, cls):
    num_classes = 2 if task == "binary" else 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    if task == "multilabel":
        y = (rng.uniform(size=(32, num_classes)) < 0.3).astype("float32")
    else:
        y = rng.integers(0, num_classes, 32).astype("int32")
    inputs = keras.Input((6,))
    outputs = heads.build_head(task, num_classes, head)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=losses.get_loss(name, task, head),
        jit_compile=True,
    )
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_get_loss_names_an_argument_the_loss_does_not_take():
    # pos_weight is a weighted-BCE argument: focal must refuse it by name, not with a TypeError.
    with pytest.raises(ValueError, match=r"'focal' takes no argument\(s\) \['pos_weight'\]"):
        losses.get_loss("focal", "multilabel", pos_weight=[1.0, 2.0])
    assert losses.get_loss("focal", "multilabel", gamma=2.5).get_config()["gamma"] == 2.5

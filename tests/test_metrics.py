"""Streaming training metrics (models/metrics.py) against sklearn, and inside a jit fit."""

import keras
import numpy as np
import pytest
from keras import ops
from sklearn import metrics as skm

from models import heads, losses
from models import metrics as mm

K = 5


def _np(x):
    return ops.convert_to_numpy(x)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _stream(metric, y, logits, batch=32, sample_weight=None):
    """Feeds the metric in batches and returns its result as a float."""
    for start in range(0, len(y), batch):
        part = slice(start, start + batch)
        sw = None if sample_weight is None else sample_weight[part]
        metric.update_state(y[part], logits[part], sample_weight=sw)
    return float(_np(metric.result()))


def _ordinal_data(n=160, seed=0):
    """Labels plus logits correlated with them, so kappa is clearly non-trivial."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n).astype("int32")
    noisy = y + rng.normal(0, 1.0, n)
    cumulative = (noisy[:, None] - np.arange(K - 1) - 0.5).astype("float32")  # ~ logit P(y>k)
    softmax = (-np.abs(noisy[:, None] - np.arange(K))).astype("float32")
    return y, cumulative, softmax


# Grades decided independently of models.heads / models.decision: the expected grade
# E = sum_k k P(k), rounded (cut-points k + 0.5), for every ordinal head.
def _rounded_expected_grade(class_probs):
    expected = class_probs @ np.arange(K)
    return (expected[:, None] >= np.arange(K - 1) + 0.5).sum(-1)


def _from_cumulative(cum):
    """P(y = k) from P(y > k), clipped at 0 and renormalised (as CORAL's can cross)."""
    ones = np.ones_like(cum[:, :1])
    diff = np.maximum(np.concatenate([ones, cum], 1) - np.concatenate([cum, 0 * ones], 1), 0)
    return diff / diff.sum(1, keepdims=True)


def _pred_softmax(logits):
    e = np.exp(logits.astype("float64"))
    return _rounded_expected_grade(e / e.sum(1, keepdims=True))


def _pred_coral(logits):
    return _rounded_expected_grade(_from_cumulative(_sig(logits.astype("float64"))))


def _pred_corn(logits):
    return _rounded_expected_grade(
        _from_cumulative(np.cumprod(_sig(logits.astype("float64")), -1)))


@pytest.mark.parametrize(
    "head,decoder", [("softmax", _pred_softmax), ("coral", _pred_coral), ("corn", _pred_corn)]
)
def test_qwk_matches_sklearn(head, decoder):
    y, cumulative, softmax = _ordinal_data()
    logits = softmax if head == "softmax" else cumulative
    expected = skm.cohen_kappa_score(y, decoder(logits), weights="quadratic", labels=range(K))
    assert 0.3 < expected < 0.99  # the data make a non-trivial case
    np.testing.assert_allclose(_stream(mm.QWK(K, head), y, logits), expected, atol=1e-6)


def test_qwk_sample_weight_binary_and_reset():
    y, cumulative, _ = _ordinal_data(seed=3)
    w = np.random.default_rng(4).uniform(0, 2, len(y)).astype("float32")
    expected = skm.cohen_kappa_score(
        y, _pred_coral(cumulative), weights="quadratic", labels=range(K), sample_weight=w
    )
    metric = mm.QWK(K, "coral")
    np.testing.assert_allclose(_stream(metric, y, cumulative, sample_weight=w), expected, 1e-5)
    metric.reset_state()
    assert float(_np(metric.result())) == 0.0  # empty: defined as 0, not NaN
    # Binary sigmoid head: p > 0.5.
    rng = np.random.default_rng(5)
    yb = rng.integers(0, 2, 64)
    logit = (yb + rng.normal(0, 0.8, 64) - 0.5).astype("float32")[:, None]
    expected = skm.cohen_kappa_score(yb, (logit[:, 0] > 0).astype(int), weights="quadratic")
    np.testing.assert_allclose(_stream(mm.QWK(2, "sigmoid"), yb, logit), expected, atol=1e-6)


def test_macro_f1_single_label_matches_sklearn():
    y, cumulative, softmax = _ordinal_data(seed=6)
    for head, logits, decoder in (
        ("softmax", softmax, _pred_softmax),
        ("coral", cumulative, _pred_coral),
    ):
        expected = skm.f1_score(y, decoder(logits), average="macro")
        metric = mm.MacroF1(K, head, "dr_grade")
        np.testing.assert_allclose(_stream(metric, y, logits), expected, atol=1e-6)
    # A class absent from labels and predictions is left out, as sklearn does by default.
    y = np.array([0, 0, 1, 1, 3, 3])
    logits = np.eye(K, dtype="float32")[[0, 1, 1, 1, 3, 0]]
    expected = skm.f1_score(y, logits.argmax(-1), average="macro")
    np.testing.assert_allclose(_stream(mm.MacroF1(K), y, logits), expected, atol=1e-6)


def _multilabel_data(n=128, c=4, seed=7):
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=(n, c)) < [0.5, 0.2, 0.1, 0.3]).astype("float32")
    logits = (2.0 * y - 1.0 + rng.normal(0, 1.5, (n, c))).astype("float32")
    return y, logits


def test_multilabel_macro_f1_matches_sklearn():
    y, logits = _multilabel_data()
    expected = skm.f1_score(y, (logits > 0).astype(int), average="macro", zero_division=0)
    np.testing.assert_allclose(_stream(mm.MultilabelMacroF1(4), y, logits), expected, atol=1e-6)
    # A label never positive nor predicted counts 0.
    y0, l0 = np.zeros((4, 2), "float32"), np.full((4, 2), -5.0, "float32")
    y0[:, 0], l0[:, 0] = 1.0, 5.0
    assert float(_stream(mm.MultilabelMacroF1(2), y0, l0)) == pytest.approx(0.5)


def test_decoded_accuracy():
    y, cumulative, _ = _ordinal_data(seed=8)
    for head, decoder in (("coral", _pred_coral), ("corn", _pred_corn)):
        expected = np.mean(decoder(cumulative) == y)
        np.testing.assert_allclose(
            _stream(mm.DecodedAccuracy(K, head), y, cumulative), expected, atol=1e-6
        )


def test_auc_close_to_sklearn():
    y, logits = _multilabel_data()
    roc = _stream(mm.HeadAUC(4, multilabel=True), y, logits)
    np.testing.assert_allclose(roc, skm.roc_auc_score(y, logits, average="macro"), atol=5e-3)
    pr = _stream(mm.HeadAUC(4, multilabel=True, curve="PR", name="map"), y, logits)
    np.testing.assert_allclose(pr, skm.average_precision_score(y, logits), atol=3e-2)
    # Binary from a two-way softmax: AUC of P(y = 1).
    rng = np.random.default_rng(9)
    yb = rng.integers(0, 2, 128)
    two_way = np.stack([np.zeros(128), yb + rng.normal(0, 1.0, 128)], -1).astype("float32")
    expected = skm.roc_auc_score(yb, two_way[:, 1])
    np.testing.assert_allclose(_stream(mm.HeadAUC(2, "softmax"), yb, two_way), expected, 5e-3)
    # Multiclass one-vs-rest on softmax probabilities.
    y, _, softmax = _ordinal_data(seed=10)
    probs = heads.probabilities(softmax, "softmax")
    expected = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    np.testing.assert_allclose(_stream(mm.HeadAUC(K, "softmax"), y, softmax), expected, 5e-3)


EXPECTED_NAMES = {
    ("binary", "sigmoid"): ["accuracy", "macro_f1", "auc", "map"],
    ("binary", "softmax"): ["accuracy", "macro_f1", "auc", "map"],
    ("multiclass", "softmax"): ["accuracy", "macro_f1", "auc"],
    ("dr_grade", "coral"): ["qwk", "accuracy", "macro_f1"],
    ("dr_grade", "corn"): ["qwk", "accuracy", "macro_f1"],
    ("dr_grade", "softmax"): ["qwk", "accuracy", "macro_f1"],
    ("multilabel", "sigmoid"): ["auc", "map", "macro_f1"],
}


def test_get_metrics_names_and_serialisation():
    for (task, head), names in EXPECTED_NAMES.items():
        metrics = mm.get_metrics(task, 2 if task == "binary" else K, head)
        assert [m.name for m in metrics] == names
        for metric in metrics:
            restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
            assert type(restored) is type(metric)
            assert restored.get_config() == metric.get_config()


def _random_task_data(task, num_classes, n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    if task == "multilabel":
        return x, (rng.uniform(size=(n, num_classes)) < 0.4).astype("float32")
    return x, rng.integers(0, num_classes, n).astype("int32")


@pytest.mark.parametrize("task,head", list(EXPECTED_NAMES), ids=lambda v: str(v))
def test_fit_jit_with_metrics(task, head):
    num_classes = 2 if task == "binary" else K
    x, y = _random_task_data(task, num_classes)
    inputs = keras.Input((6,))
    model = keras.Model(inputs, heads.build_head(task, num_classes, head)(inputs))
    model.compile(
        optimizer="adam",
        loss=losses.get_loss(None, task, head),
        metrics=mm.get_metrics(task, num_classes, head),
        jit_compile=True,
    )
    history = model.fit(x, y, batch_size=16, epochs=1, validation_data=(x, y), verbose=0)
    for name in EXPECTED_NAMES[(task, head)]:
        value = history.history[f"val_{name}"][0]
        assert np.isfinite(value) and -1.0 <= value <= 1.0, (name, value)
    # evaluate() agrees with a fresh metric streamed by hand over the same predictions.
    scores = model.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    logits = _np(model(x, training=False))
    for metric in mm.get_metrics(task, num_classes, head):
        np.testing.assert_allclose(scores[metric.name], _stream(metric, y, logits, 16), atol=1e-5)


def test_saved_model_keeps_metrics(tmp_path):
    x, y = _random_task_data("dr_grade", K)
    inputs = keras.Input((6,))
    model = keras.Model(inputs, heads.build_head("dr_grade", K, "coral")(inputs))
    model.compile(
        optimizer="sgd", loss=losses.CoralLoss(), metrics=mm.get_metrics("dr_grade", K, "coral")
    )
    before = model.evaluate(x, y, return_dict=True, verbose=0)
    model.save(tmp_path / "m.keras")
    after = keras.saving.load_model(tmp_path / "m.keras").evaluate(
        x, y, return_dict=True, verbose=0
    )
    for name in ("qwk", "accuracy", "macro_f1"):
        np.testing.assert_allclose(after[name], before[name], atol=1e-6)

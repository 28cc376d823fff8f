"""evaluation.calibration: temperature scaling undoes deliberate over-confidence."""

import numpy as np
import pytest

from evaluation import calibration


def _sample(rng, probs):
    """One class per row drawn from probs [N, K]: labels that make `probs` calibrated."""
    return (rng.random((len(probs), 1)) > np.cumsum(probs, 1)).sum(1)


def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_softmax_overconfident_gets_t_above_one_and_lower_ece():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (3000, 4))
    y = _sample(rng, _softmax(logits))
    out = calibration.calibrate(5 * logits[:2000], y[:2000], "softmax",
                                5 * logits[2000:], y[2000:])
    assert 3.5 < out["temperature"] < 7.0  # the true temperature is 5
    for split in ("val", "test"):
        assert out["ece"][split]["after"] < 0.5 * out["ece"][split]["before"]
        assert out["nll"][split]["after"] < out["nll"][split]["before"]
    assert sum(b["count"] for b in out["reliability"]["test"]["after"]) == 1000


def test_sigmoid_shared_and_per_class():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (2000, 3))
    y = (rng.random(logits.shape) < 1 / (1 + np.exp(-logits))).astype(int)
    over = logits * np.array([5.0, 5.0, 2.0])
    shared = calibration.fit_temperature(over, y, "sigmoid")
    per = calibration.fit_temperature(over, y, "sigmoid", per_class=True)
    assert shared > 1.5
    assert per[0] == pytest.approx(5, rel=0.3) and per[2] == pytest.approx(2, rel=0.3)
    out = calibration.calibrate(over, y, "sigmoid", per_class=True)
    assert out["ece"]["val"]["after"] < out["ece"]["val"]["before"]


def test_coral_cumulative_logits():
    rng = np.random.default_rng(2)
    s = rng.normal(0, 2, (3000, 1))
    cum_logits = s - np.array([-1.5, 0.0, 1.5])  # logit of P(y > k), k = 0..2
    cum = 1 / (1 + np.exp(-cum_logits))
    probs = np.diff(np.concatenate([np.ones((3000, 1)), cum, np.zeros((3000, 1))], 1) * -1, 1)
    y = _sample(rng, probs)
    out = calibration.calibrate(5 * cum_logits, y, "coral")
    assert out["temperature"] > 3.0
    assert out["ece"]["val"]["after"] < out["ece"]["val"]["before"]


def test_ece_hand_computed():
    # Two bins used: conf 0.9 (2 images, 1 right) and 0.6 (2 images, both right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    rel = calibration.reliability(probs, [0, 1, 1, 1], multilabel=False)
    assert rel["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert len(rel["bins"]) == 15 and sum(b["count"] for b in rel["bins"]) == 4
    assert calibration.reliability(np.array([[0.25]]), [[1]], multilabel=True)["ece"] == 0.75

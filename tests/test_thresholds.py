"""evaluation.thresholds on hand-made arrays with hand-computed answers."""

import numpy as np
import pytest

from evaluation import thresholds


def test_grid():
    assert thresholds.GRID[0] == 0.1 and thresholds.GRID[-1] == 0.9 and len(thresholds.GRID) == 17
    assert 0.7 in thresholds.GRID


def test_max_threshold_is_respected():
    y = [1, 1, 1, 0, 0, 0, 0, 0]
    p = [0.9, 0.85, 0.5, 0.75, 0.75, 0.75, 0.1, 0.1]
    # t in {0.8, 0.85}: tp 2, fp 0, fn 1 -> F1 0.8; t in 0.15..0.5: tp 3, fp 3 -> F1 2/3.
    free = thresholds.label_threshold(y, p, max_threshold=0.9)
    assert free["threshold"] == 0.8 and free["f1"] == pytest.approx(0.8)
    capped = thresholds.label_threshold(y, p, max_threshold=0.7)
    assert capped["threshold"] == 0.15 and capped["f1"] == pytest.approx(2 / 3)
    assert capped["recall"] == 1.0 and capped["reason"] is None


def test_min_recall_is_respected():
    y = [1] * 10 + [0] * 50
    p = [0.95, 0.9] + [0.2] * 8 + [0.25] * 50
    # t in 0.3..0.7: tp 2, fp 0, fn 8 -> F1 1/3 but recall 0.2; t <= 0.2: F1 20/70, recall 1.
    free = thresholds.label_threshold(y, p, min_recall=0.0)
    assert free["threshold"] == 0.3 and free["recall"] == pytest.approx(0.2)
    bounded = thresholds.label_threshold(y, p, min_recall=0.3)
    assert bounded["threshold"] == 0.1 and bounded["f1"] == pytest.approx(20 / 70)


def test_fallback_records_why():
    low = thresholds.label_threshold([1, 1, 0], [0.05, 0.05, 0.0])
    assert low["threshold"] == 0.5 and "recall" in low["reason"]
    none = thresholds.label_threshold([0, 0, 0], [0.2, 0.6, 0.1])
    assert none["threshold"] == 0.5 and none["reason"] == "no positives in validation"
    assert none["recall"] is None and none["precision"] == 0.0


def test_multilabel_rule_and_apply():
    y = np.array([[1, 0], [1, 0], [0, 0], [0, 1]])
    probs = np.array([[0.9, 0.1], [0.6, 0.2], [0.3, 0.1], [0.2, 0.05]])
    rule = thresholds.multilabel_rule(y, probs, ["a", "b"])
    # a: t in 0.35..0.6 separates perfectly -> lowest tied 0.35; b: recall 0 -> fallback.
    assert rule["thresholds"] == [0.35, 0.5]
    assert rule["details"]["b"]["reason"] is not None
    dec = thresholds.apply_rule(rule, np.array([[0.35, 0.5], [0.34, 0.49]]))
    np.testing.assert_array_equal(dec, [[1, 1], [0, 0]])


def test_binary_rule_f1_and_youden():
    y = [1, 1, 0, 1, 0, 0]
    p = [0.9, 0.8, 0.7, 0.6, 0.3, 0.1]
    rule = thresholds.binary_rule(y, p)
    # F1 at 0.6: tp 3, fp 1 -> 6/7. Youden 2/3 at 0.8 and 0.6: ties go to the higher.
    assert rule["threshold"] == 0.6 and rule["f1"]["value"] == pytest.approx(6 / 7)
    assert rule["youden"] == {"threshold": 0.8, "value": pytest.approx(2 / 3)}
    assert thresholds.binary_rule(y, p, "youden")["threshold"] == 0.8
    np.testing.assert_array_equal(thresholds.apply_rule(rule, np.array([[0.59], [0.6]])), [0, 1])
    single = thresholds.binary_rule([0, 0], [0.2, 0.3])
    assert single["threshold"] == 0.5 and single["reason"]


def test_ordinal_cutpoints_improve_qwk_and_stay_monotone():
    # Expected grades are biased low: grade 2 images sit at E = 1.1, below the default 1.5.
    probs = np.array([[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.0, 0.9, 0.1]] * 4)
    y = np.array([0, 1, 2] * 4)
    np.testing.assert_allclose(thresholds.expected_grade(probs[:3]), [0.1, 0.6, 1.1])
    rule = thresholds.ordinal_rule(y, probs)
    c0, c1 = rule["cutpoints"]
    assert rule["qwk_tuned"] == pytest.approx(1.0) and rule["qwk_default"] < 1.0
    assert 0.1 < c0 <= 0.6 < c1 <= 1.1 and c0 < c1
    np.testing.assert_array_equal(thresholds.apply_rule(rule, probs), y)


def test_apply_cutpoints_hand():
    np.testing.assert_array_equal(
        thresholds.apply_cutpoints(np.array([0.0, 0.5, 1.49, 3.9]), [0.5, 1.5, 2.5, 3.5]),
        [0, 1, 1, 4])
    assert thresholds.tune_rule("multiclass", [0], [[1.0]], ["a"]) == {"type": "argmax"}

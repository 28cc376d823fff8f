"""models.decision on hand-made arrays with hand-computed answers: tuning, applying, and the
agreement of training metrics, evaluation and the export graph."""

import numpy as np
import pytest
from keras import ops

from models import decision


def test_grid():
    assert decision.GRID[0] == 0.1 and decision.GRID[-1] == 0.9 and len(decision.GRID) == 17
    assert 0.7 in decision.GRID


def test_max_threshold_is_respected():
    y = [1, 1, 1, 0, 0, 0, 0, 0]
    p = [0.9, 0.85, 0.5, 0.75, 0.75, 0.75, 0.1, 0.1]
    # t in {0.8, 0.85}: tp 2, fp 0, fn 1 -> F1 0.8; t in 0.15..0.5: tp 3, fp 3 -> F1 2/3.
    free = decision.label_threshold(y, p, max_threshold=0.9)
    assert free["threshold"] == 0.8 and free["f1"] == pytest.approx(0.8)
    capped = decision.label_threshold(y, p, max_threshold=0.7)
    assert capped["threshold"] == 0.15 and capped["f1"] == pytest.approx(2 / 3)
    assert capped["recall"] == 1.0 and capped["reason"] is None


def test_min_recall_is_respected():
    y = [1] * 10 + [0] * 50
    p = [0.95, 0.9] + [0.2] * 8 + [0.25] * 50
    # t in 0.3..0.7: tp 2, fp 0, fn 8 -> F1 1/3 but recall 0.2; t <= 0.2: F1 20/70, recall 1.
    free = decision.label_threshold(y, p, min_recall=0.0)
    assert free["threshold"] == 0.3 and free["recall"] == pytest.approx(0.2)
    bounded = decision.label_threshold(y, p, min_recall=0.3)
    assert bounded["threshold"] == 0.1 and bounded["f1"] == pytest.approx(20 / 70)


def test_fallback_records_why():
    low = decision.label_threshold([1, 1, 0], [0.05, 0.05, 0.0])
    assert low["threshold"] == 0.5 and "recall" in low["reason"]
    none = decision.label_threshold([0, 0, 0], [0.2, 0.6, 0.1])
    assert none["threshold"] == 0.5 and none["reason"] == "no positives in validation"
    assert none["recall"] is None and none["precision"] == 0.0


def test_multilabel_rule_and_apply():
    y = np.array([[1, 0], [1, 0], [0, 0], [0, 1]])
    probs = np.array([[0.9, 0.1], [0.6, 0.2], [0.3, 0.1], [0.2, 0.05]])
    rule = decision.multilabel_rule(y, probs, ["a", "b"])
    # a: t in 0.35..0.6 separates perfectly -> lowest tied 0.35; b: recall 0 -> fallback.
    assert rule["thresholds"] == [0.35, 0.5]
    assert rule["details"]["b"]["reason"] is not None
    dec = decision.apply_rule(rule, np.array([[0.35, 0.5], [0.34, 0.49]]))
    np.testing.assert_array_equal(dec, [[1, 1], [0, 0]])


def test_binary_rule_f1_and_youden():
    y = [1, 1, 0, 1, 0, 0]
    p = [0.9, 0.8, 0.7, 0.6, 0.3, 0.1]
    rule = decision.binary_rule(y, p)
    # F1 at 0.6: tp 3, fp 1 -> 6/7. Youden 2/3 at 0.8 and 0.6: ties go to the higher.
    assert rule["threshold"] == 0.6 and rule["f1"]["value"] == pytest.approx(6 / 7)
    assert rule["youden"] == {"threshold": 0.8, "value": pytest.approx(2 / 3)}
    assert decision.binary_rule(y, p, "youden")["threshold"] == 0.8
    np.testing.assert_array_equal(decision.apply_rule(rule, np.array([[0.59], [0.6]])), [0, 1])
    single = decision.binary_rule([0, 0], [0.2, 0.3])
    assert single["threshold"] == 0.5 and single["reason"]


def test_ordinal_cutpoints_improve_qwk_and_stay_monotone():
    # Expected grades are biased low: grade 2 images sit at E = 1.1, below the default 1.5.
    probs = np.array([[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.0, 0.9, 0.1]] * 4)
    y = np.array([0, 1, 2] * 4)
    np.testing.assert_allclose(decision.expected_grade(probs[:3]), [0.1, 0.6, 1.1])
    rule = decision.ordinal_rule(y, probs)
    c0, c1 = rule["cutpoints"]
    assert rule["qwk_tuned"] == pytest.approx(1.0) and rule["qwk_default"] < 1.0
    assert 0.1 < c0 <= 0.6 < c1 <= 1.1 and c0 < c1
    np.testing.assert_array_equal(decision.apply_rule(rule, probs), y)


def test_apply_cutpoints_hand():
    np.testing.assert_array_equal(
        decision.apply_cutpoints(np.array([0.0, 0.5, 1.49, 3.9]), [0.5, 1.5, 2.5, 3.5]),
        [0, 1, 1, 4])
    assert decision.tune_rule("multiclass", [0], [[1.0]], ["a"]) == {"type": "argmax"}


# ------------------------------------------------ one rule: training metric = evaluation = export

def _logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p / (1 - p)).astype("float32")


# (task, head, K, logits [N, D], decisions by hand). Probabilities are hand-made; the
# comments give the class probabilities and the decision each rule makes.
CASES = [
    # CORAL P(y>k) = (.9,.45,.45,.45) -> P = (.1,.45,0,0,.45), E = 2.25 -> 2 (count rule: 1);
    # (.9,.6,.2,.1) -> (.1,.3,.4,.1,.1), E = 1.8 -> 2; (.8,.4,.1,.05) -> E = 1.35 -> 1.
    ("dr_grade", "coral", 5, _logit([[.9, .45, .45, .45], [.9, .6, .2, .1], [.8, .4, .1, .05]]),
     [2, 2, 1]),
    # CORN P(y>k | y>k-1) = (.9,.5,.5,.5) -> P(y>k) = (.9,.45,.225,.1125)
    # -> P = (.1,.45,.225,.1125,.1125), E = 1.6875 -> 2 (count rule: 1).
    ("dr_grade", "corn", 5, _logit([[.9, .5, .5, .5], [.2, .5, .5, .5]]), [2, 0]),
    # Softmax grades (.4,.1,.1,.1,.3): E = 1.8 -> 2 (argmax: 0); (.05,.7,.1,.1,.05): E = 1.4 -> 1.
    ("dr_grade", "softmax", 5, np.log([[.4, .1, .1, .1, .3], [.05, .7, .1, .1, .05]]), [2, 1]),
    # Multiclass argmax, ties to the first maximum.
    ("multiclass", "softmax", 3, np.log([[.2, .5, .3], [.4, .4, .2]]), [1, 0]),
    # Binary sigmoid: P(1) >= 0.5.
    ("binary", "sigmoid", 2, _logit([[.5], [.3], [.7]]), [1, 0, 1]),
    # Binary two-way softmax: the same threshold on P(1) (.5 -> 1, where argmax says 0).
    ("binary", "softmax", 2, np.log([[.5, .5], [.6, .4], [.3, .7]]), [1, 0, 1]),
    # Multilabel: every label with P >= 0.5.
    ("multilabel", "sigmoid", 3, _logit([[.7, .5, .2], [.1, .9, .49]]), [[1, 1, 0], [0, 1, 0]]),
]


def _training_metric_decisions(task, head, k, logits, expected):
    """Decisions as the checkpoint-selecting metrics see them, from their confusion counts."""
    from models import metrics as mm

    expected = np.asarray(expected)
    if task == "multilabel":
        metric = mm.MultilabelMacroF1(k)
        metric.update_state(expected.astype("float32"), logits)
        tp, fp, fn = ops.convert_to_numpy(metric.counts)
        return tp.sum() == expected.sum() and fp.sum() == 0 and fn.sum() == 0
    metric = mm.MacroF1(k, head, task)
    metric.update_state(expected, logits)
    confusion = ops.convert_to_numpy(metric.confusion)
    accuracy = mm.DecodedAccuracy(k, head, task)
    accuracy.update_state(expected, logits)
    diagonal_only = confusion.sum() == len(expected) and np.trace(confusion) == len(expected)
    return diagonal_only and float(ops.convert_to_numpy(accuracy.result())) == 1.0


@pytest.mark.parametrize("task,head,k,logits,expected", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_training_evaluation_and_export_decide_alike(task, head, k, logits, expected):
    import tensorflow as tf

    from evaluation import thresholds
    from serving import exporting

    logits = np.asarray(logits, "float32")
    rule = decision.default_rule(task, k)
    # evaluate.py: numpy through models.decision.decide (and the re-exported apply_rule).
    evaluated = decision.decide(logits, head, rule)["decision"]
    np.testing.assert_array_equal(evaluated, expected)
    probs = decision.decide(logits, head, rule)["probabilities"]
    np.testing.assert_array_equal(thresholds.apply_rule(rule, probs), expected)
    # Export: the serving graph's post-processing, traced by tf.function.
    spec = exporting.ServingSpec(task=task, head=head, class_names=tuple(map(str, range(k))),
                                 rule=rule, preprocess=None)
    graph = tf.function(lambda x: exporting.postprocess(x, spec))
    served = graph(tf.constant(logits))[spec.decision_name].numpy()
    np.testing.assert_array_equal(served, expected)
    assert served.dtype == np.int32 and evaluated.dtype == np.int32
    # Training: the metrics that select the best checkpoint.
    assert _training_metric_decisions(task, head, k, logits, expected)


def test_default_rule_is_the_tuners_start_and_same_for_every_ordinal_head():
    assert decision.default_rule("dr_grade", 5)["cutpoints"] == [0.5, 1.5, 2.5, 3.5]
    probs = np.eye(5)[[0, 1, 2, 3, 4, 2]]
    rule = decision.ordinal_rule([0, 1, 2, 3, 4, 2], probs)
    assert rule["cutpoints"] == [0.5, 1.5, 2.5, 3.5] and rule["qwk_default"] == 1.0


def test_temperature_divides_logits_before_the_rule():
    # Softmax grades, logits (0, 0, 2): P(2) = .79, E = 1.68 -> 2; at T = 10 the
    # probabilities flatten to ~(.31, .31, .38), E = 1.06 -> 1.
    logits = np.array([[0.0, 0.0, 2.0]], "float32")
    rule = decision.default_rule("dr_grade", 3)
    assert decision.decide(logits, "softmax", rule)["decision"][0] == 2
    assert decision.decide(logits, "softmax", rule, temperature=10.0)["decision"][0] == 1


def test_check_rule_names_the_file():
    with pytest.raises(ValueError, match="t.json: expected a 'ordinal_cutpoints'"):
        decision.check_rule({"type": "argmax"}, "dr_grade", 5, where="t.json")
    with pytest.raises(ValueError, match="cutpoints has 2 values, the model has 5 classes"):
        decision.check_rule({"type": "ordinal_cutpoints", "cutpoints": [1, 2]}, "dr_grade", 5)


def test_served_logits_average_the_flips():
    images = np.arange(2 * 3 * 3 * 1, dtype="float32").reshape(2, 3, 3, 1)

    def model(x, training=False):  # one logit: the top-left pixel
        return ops.reshape(x[:, 0, 0, :], (-1, 1))

    got = ops.convert_to_numpy(decision.served_logits(model, images, tta=True))
    # views: pixel (0,0), horizontal flip -> (0,2), vertical flip -> (2,0).
    want = (images[:, 0, 0] + images[:, 0, 2] + images[:, 2, 0]) / 3
    np.testing.assert_allclose(got, want)
    np.testing.assert_array_equal(decision.served_logits(model, images), images[:, 0, 0])

"""evaluation.metrics and evaluation.bootstrap on hand-made arrays with hand-computed answers."""

import collections

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, cohen_kappa_score, roc_auc_score

from evaluation import bootstrap, metrics


def test_auc_and_ap_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    score = np.round(rng.random(200) + 0.3 * y, 1)  # rounding makes many ties
    assert metrics.auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert metrics.average_precision(y, score) == pytest.approx(
        average_precision_score(y, score), abs=1e-12)


def test_qwk_hand_computed():
    # cm = [[1,0,0],[0,0,1],[0,0,1]]: observed weighted disagreement 0.25, expected 1.25.
    cm = metrics.confusion_matrix([0, 1, 2], [0, 2, 2], 3)
    assert metrics.qwk(cm) == pytest.approx(0.8)
    assert metrics.qwk(cm) == pytest.approx(cohen_kappa_score([0, 1, 2], [0, 2, 2],
                                                              weights="quadratic"))
    with pytest.raises(metrics.Undefined):
        metrics.qwk(metrics.confusion_matrix([1, 1], [1, 1], 3))


def test_dr_grade_referable_metrics():
    y = [0, 1, 2, 4, 0, 3]
    probs = np.array([[0.7, 0.2, 0.1, 0, 0], [0.2, 0.5, 0.2, 0.1, 0], [0.1, 0.2, 0.3, 0.3, 0.1],
                      [0, 0, 0.1, 0.2, 0.7], [0.3, 0.2, 0.4, 0.1, 0], [0.1, 0.5, 0.2, 0.2, 0]])
    dec = [0, 1, 2, 4, 2, 1]
    r = metrics.compute_metrics("dr_grade", y, probs, dec, list("01234"), n_boot=0)
    m = r["metrics"]
    # P(referable) = [.1, .3, .7, 1., .5, .4]; positives .7, 1., .4 beat 8 of 9 negatives.
    assert m["referable_auc"] == pytest.approx(8 / 9)
    assert m["referable_sensitivity"] == pytest.approx(2 / 3)
    assert m["referable_specificity"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Top-1 of the probabilities, whatever the decisions: argmax [0, 1, 2 (first of the
    # tied .3s), 4, 2, 1] hits 4 of 6.
    always_0 = metrics.compute_metrics("dr_grade", y, probs, [0] * 6, list("01234"), n_boot=0)
    assert always_0["metrics"]["argmax_accuracy"] == pytest.approx(4 / 6)
    assert always_0["metrics"]["accuracy"] == pytest.approx(2 / 6)
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, dec, weights="quadratic"))
    assert r["confusion_matrix"][0] == [1, 0, 1, 0, 0]
    assert r["headline"][0] == "qwk"
    # Any DR (grade >= 1) scored by 1 - P(0) = [.3, .8, .9, 1., .7, .9]: both
    # negatives (.3, .7) score below every positive.
    assert m["any_dr_auc"] == pytest.approx(1.0)
    assert m["macro_auc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_macro_auc_matches_sklearn_ovr_and_medmnist():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 300)
    logits = rng.normal(size=(300, 5)) + 1.5 * np.eye(5)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    sk = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    # MedMNIST's getAUC: the plain mean of the per-class one-vs-rest AUCs.
    medmnist = np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(5)])
    assert metrics.macro_auc(y, probs) == pytest.approx(sk, abs=1e-12)
    assert metrics.macro_auc(y, probs) == pytest.approx(medmnist, abs=1e-12)
    dec = np.argmax(probs, 1)
    r = metrics.compute_metrics("dr_grade", y, probs, dec, list("01234"), n_boot=50)
    assert r["metrics"]["macro_auc"] == pytest.approx(sk, abs=1e-12)
    ci = r["confidence_intervals"]["macro_auc"]
    assert ci["low"] < sk < ci["high"]


def test_binary_metrics_and_ci():
    y = [1, 1, 0, 0, 1, 0]
    p = np.array([0.9, 0.4, 0.35, 0.1, 0.8, 0.7])
    r = metrics.compute_metrics("binary", y, p[:, None], (p >= 0.5).astype(int), ["neg", "pos"],
                                patient_ids=["a", "a", "b", "c", "d", "e"], n_boot=200)
    m = r["metrics"]
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert r["num_patients"] == 5
    ci = r["confidence_intervals"]["auc"]
    assert ci["low"] <= m["auc"] <= ci["high"] and ci["method"] == "patient_cluster_percentile"
    assert 0 < ci["n_valid"] <= 200


def test_undefined_metrics_are_null_with_reason():
    y = [0, 0, 0, 0]
    p = np.array([0.1, 0.6, 0.2, 0.3])
    r = metrics.compute_metrics("binary", y, p, (p >= 0.5).astype(int), ["neg", "pos"], n_boot=20)
    assert r["metrics"]["auc"] is None and "one class" in r["undefined"]["auc"]
    assert r["metrics"]["sensitivity"] is None and r["undefined"]["sensitivity"] == "no positives"
    assert r["metrics"]["specificity"] == pytest.approx(0.75)
    assert r["confidence_intervals"]["auc"]["low"] is None
    assert r["confidence_intervals"]["specificity"]["low"] is not None


def test_multiclass_absent_class():
    y = [0, 0, 1, 1]
    probs = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3]])
    r = metrics.compute_metrics("multiclass", y, probs, [0, 1, 1, 1], ["a", "b", "c"], n_boot=0)
    # F1: a = 2/3, b = 4/5, c undefined (never present, never predicted).
    assert r["metrics"]["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert r["per_class"]["c"]["auc"] is None
    assert "per_class/c/auc" in r["undefined"] and "per_class/c/f1" in r["undefined"]
    assert r["per_class"]["a"]["auc"] == pytest.approx(1.0)
    assert r["metrics"]["macro_auc"] == pytest.approx(1.0)


def test_multilabel_metrics():
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0]])
    dec = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    probs = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.1], [0.6, 0.1, 0.2], [0.2, 0.4, 0.1]])
    r = metrics.compute_metrics("multilabel", y, probs, dec, ["x", "y", "z"], n_boot=0)
    m, pc = r["metrics"], r["per_class"]
    assert (pc["x"]["precision"], pc["x"]["recall"], pc["x"]["f1"]) == pytest.approx((.5, .5, .5))
    assert (pc["y"]["precision"], pc["y"]["recall"], pc["y"]["f1"]) == pytest.approx(
        (1, .5, 2 / 3))
    assert pc["x"]["average_precision"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert pc["x"]["auc"] == pytest.approx(0.75)
    assert pc["z"]["f1"] is None and pc["z"]["auc"] is None and pc["z"]["support"] == 0
    assert m["macro_f1"] == pytest.approx(7 / 12)
    assert m["micro_f1"] == pytest.approx(4 / 7)
    assert m["hamming_loss"] == pytest.approx(3 / 12)
    assert m["exact_match"] == pytest.approx(1 / 4)
    assert r["label_confusion"]["x"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}


def test_cluster_bootstrap_keeps_patients_whole():
    ids = ["a", "a", "b", "c", "c", "c", ""]
    groups = bootstrap.patient_groups(len(ids), ids)
    assert len(groups[1]) == 4  # the unknown id is its own patient
    rng = np.random.default_rng(1)
    for _ in range(30):
        idx = bootstrap.resample_indices(rng, *groups)
        counts = collections.Counter(ids[i] or "?" for i in idx)
        assert counts["a"] % 2 == 0 and counts["c"] % 3 == 0
        assert len(idx) == sum(counts.values())


def test_bootstrap_reproducible_with_seed():
    x = np.arange(50, dtype=float)
    stat = {"mean": lambda i: float(x[i].mean())}
    a = bootstrap.bootstrap_ci(stat, 50, n_boot=100, seed=3)
    b = bootstrap.bootstrap_ci(stat, 50, n_boot=100, seed=3)
    assert a == b and a["mean"]["low"] < 24.5 < a["mean"]["high"]


def test_curves():
    y = [1, 1, 0, 0]
    c = metrics.compute_curves("binary", y, np.array([0.9, 0.6, 0.7, 0.1]), ["neg", "pos"])
    assert c["roc"]["pos"]["auc"] == pytest.approx(0.75)
    assert c["roc"]["pos"]["tpr"][-1] == 1.0
    empty = metrics.compute_curves("multilabel", np.zeros((3, 1)), np.ones((3, 1)) * .2, ["z"])
    assert empty == {"roc": {}, "pr": {}}


def test_no_patient_ids_means_image_level_intervals():
    y = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    p = np.array([0.1, 0.9, 0.3, 0.6, 0.8, 0.4, 0.7, 0.2])
    dec = (p >= 0.5).astype(int)
    for ids in (None, [""] * 8):  # a source without ids (APTOS, IDRiD, RetinaMNIST npz)
        r = metrics.compute_metrics("binary", y, p, dec, ["neg", "pos"], patient_ids=ids,
                                    n_boot=20)
        assert r["ci_unit"] == "image" and r["num_patients"] is None
        assert r["confidence_intervals"]["auc"]["method"] == "image_percentile"
    r = metrics.compute_metrics("binary", y, p, dec, ["neg", "pos"], n_boot=20,
                                patient_ids=["a", "a", "b", "b", "c", "", "d", "d"])
    assert r["ci_unit"] == "patient" and r["num_patients"] == 5
    assert r["confidence_intervals"]["auc"]["method"] == "patient_cluster_percentile"

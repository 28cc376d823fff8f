"""Split-level metrics per task, with patient-level bootstrap CIs for the headline ones.

All inputs are numpy arrays (N examples, K classes, C labels):

| task       | y_true         | probs                        | decisions        |
| ---------- | -------------- | ---------------------------- | ---------------- |
| dr_grade   | int [N] 0..K-1 | float [N, K] grade probs     | int [N] grade    |
| binary     | int [N] 0/1    | float [N], [N, 1] P(1), [N, 2]| int [N] 0/1     |
| multiclass | int [N] 0..K-1 | float [N, K] class probs     | int [N] class    |
| multilabel | 0/1 [N, C]     | float [N, C] P(label)        | 0/1 [N, C]       |

A metric that is undefined on the split (AUC with one class present, recall of a
class with no positives, ...) is reported as None (JSON null) and its reason is
stored in `result["undefined"]` under the same key; it is never silently 0.
Macro averages are taken over the classes where the metric is defined.

AUC and AP are computed here in numpy (rank-based AUC with tie correction, AP as
in sklearn's `average_precision_score`) because the bootstrap calls them
thousands of times; `tests/test_eval_metrics.py` checks them against sklearn.
"""

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import precision_recall_curve, roc_curve

from evaluation import bootstrap

# Defined beside the decision rules, whose tuner optimises QWK; evaluation uses the same ones.
from models.decision import Undefined, binary_probs, confusion_matrix, qwk  # noqa: F401

REFERABLE_GRADE = 2  # ICDR: moderate NPDR or worse is referable.

HEADLINE = {
    "dr_grade": ("qwk", "accuracy", "argmax_accuracy", "macro_auc", "referable_auc",
                 "any_dr_auc", "referable_sensitivity", "referable_specificity"),
    "binary": ("auc", "sensitivity", "specificity", "balanced_accuracy"),
    "multiclass": ("accuracy", "macro_f1", "macro_auc"),
    "multilabel": ("macro_f1", "micro_f1", "map", "macro_auc"),
}


# --------------------------------------------------------------------------- primitives

def _ratio(num: float, den: float, reason: str) -> float:
    if den == 0:
        raise Undefined(reason)
    return float(num) / float(den)


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties). y: 0/1 [N]; score: float [N]."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise Undefined(f"only one class present ({n_pos} positives, {n_neg} negatives)")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over distinct score thresholds (as sklearn)."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise Undefined("no positives")
    order = np.argsort(-np.asarray(score, np.float64), kind="stable")
    s, yy = np.asarray(score)[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(yy)[last]
    precision = tp / (last + 1.0)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _per_class_counts(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    return tp, cm.sum(0) - tp, cm.sum(1) - tp  # tp, fp, fn


def f1_from_counts(tp: float, fp: float, fn: float) -> float:
    """F1 = 2TP / (2TP + FP + FN); undefined without positives and positive predictions."""
    return _ratio(2 * tp, 2 * tp + fp + fn, "no positives and no positive predictions")


def _binary_counts(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    return (int((y & pred).sum()), int((~y & pred).sum()), int((y & ~pred).sum()),
            int((~y & ~pred).sum()))


def sensitivity(y: np.ndarray, pred: np.ndarray) -> float:
    tp, _, fn, _ = _binary_counts(y, pred)
    return _ratio(tp, tp + fn, "no positives")


def specificity(y: np.ndarray, pred: np.ndarray) -> float:
    _, fp, _, tn = _binary_counts(y, pred)
    return _ratio(tn, tn + fp, "no negatives")


def _mean_defined(fns: Sequence[Callable[[], float]], what: str) -> float:
    vals = []
    for fn in fns:
        try:
            vals.append(fn())
        except Undefined:
            pass
    if not vals:
        raise Undefined(f"{what} undefined for every class")
    return float(np.mean(vals))


# --------------------------------------------------------------------------- per task
# Each `_stats_<task>` returns name -> function of an index array, so the same code
# gives the split value (all indices) and the bootstrap replicates.

def macro_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest ROC AUC averaged over the classes where it is defined.

    y: int [N] in 0..K-1; probs: float [N, K]. With every class present this is
    MedMNIST's AUC for multi-class tasks and sklearn's
    `roc_auc_score(y, probs, multi_class="ovr", average="macro")`.
    """
    return _mean_defined([lambda c=c: auc(y == c, probs[:, c]) for c in range(probs.shape[1])],
                         "AUC")


def _stats_dr_grade(y, probs, dec, k, referable_grade):
    p_ref = probs[:, referable_grade:].sum(1)  # P(grade >= referable_grade)
    y_ref, d_ref = y >= referable_grade, dec >= referable_grade
    p_any = 1.0 - probs[:, 0]  # P(grade >= 1): any DR
    return {
        "qwk": lambda i: qwk(confusion_matrix(y[i], dec[i], k)),
        "accuracy": lambda i: float(np.mean(y[i] == dec[i])),
        # MedMNIST's ACC: top-1 of the probabilities (first maximum), not the tuned decision.
        "argmax_accuracy": lambda i: float(np.mean(y[i] == probs[i].argmax(1))),
        "weighted_f1": lambda i: _weighted_f1(confusion_matrix(y[i], dec[i], k)),
        "macro_auc": lambda i: macro_auc(y[i], probs[i]),
        "referable_auc": lambda i: auc(y_ref[i], p_ref[i]),
        "any_dr_auc": lambda i: auc(y[i] >= 1, p_any[i]),
        "referable_sensitivity": lambda i: sensitivity(y_ref[i], d_ref[i]),
        "referable_specificity": lambda i: specificity(y_ref[i], d_ref[i]),
    }


def _weighted_f1(cm: np.ndarray) -> float:
    tp, fp, fn = _per_class_counts(cm)
    support = cm.sum(1)
    present = support > 0  # classes with support > 0 always have a defined F1
    return float((support[present] * 2 * tp[present]
                  / (2 * tp[present] + fp[present] + fn[present])).sum() / support.sum())


def _stats_binary(y, p, dec):
    def balanced(i):
        return 0.5 * (sensitivity(y[i], dec[i]) + specificity(y[i], dec[i]))

    def f1(i):
        tp, fp, fn, _ = _binary_counts(y[i], dec[i])
        return f1_from_counts(tp, fp, fn)

    return {
        "auc": lambda i: auc(y[i], p[i]),
        "sensitivity": lambda i: sensitivity(y[i], dec[i]),
        "specificity": lambda i: specificity(y[i], dec[i]),
        "balanced_accuracy": balanced,
        "accuracy": lambda i: float(np.mean(y[i] == dec[i])),
        "f1": f1,
    }


def _stats_multiclass(y, probs, dec, k):
    def macro_f1(i):
        tp, fp, fn = _per_class_counts(confusion_matrix(y[i], dec[i], k))
        return _mean_defined([lambda c=c: f1_from_counts(tp[c], fp[c], fn[c])
                              for c in range(k)], "F1")

    return {"accuracy": lambda i: float(np.mean(y[i] == dec[i])), "macro_f1": macro_f1,
            "macro_auc": lambda i: macro_auc(y[i], probs[i])}


def _stats_multilabel(y, probs, dec):
    c_range = range(y.shape[1])

    def macro_f1(i):
        return _mean_defined([lambda c=c: f1_from_counts(*_binary_counts(y[i, c], dec[i, c])[:3])
                              for c in c_range], "F1")

    def micro_f1(i):
        tp, fp, fn, _ = _binary_counts(y[i].ravel(), dec[i].ravel())
        return f1_from_counts(tp, fp, fn)

    return {
        "macro_f1": macro_f1,
        "micro_f1": micro_f1,
        "map": lambda i: _mean_defined([lambda c=c: average_precision(y[i, c], probs[i, c])
                                        for c in c_range], "AP"),
        "macro_auc": lambda i: _mean_defined([lambda c=c: auc(y[i, c], probs[i, c])
                                              for c in c_range], "AUC"),
        "hamming_loss": lambda i: float(np.mean(y[i] != dec[i])),
        "exact_match": lambda i: float(np.mean(np.all(y[i] == dec[i], axis=1))),
    }


def _per_class_single_label(y, probs, cm, class_names):
    tp, fp, fn = _per_class_counts(cm)
    rows = {}
    for c, name in enumerate(class_names):
        rows[name] = {
            "support": lambda c=c: int(cm[c].sum()),
            "precision": lambda c=c: _ratio(tp[c], tp[c] + fp[c], "never predicted"),
            "recall": lambda c=c: _ratio(tp[c], tp[c] + fn[c], "absent from the split"),
            "f1": lambda c=c: f1_from_counts(tp[c], fp[c], fn[c]),
            "auc": lambda c=c: auc(y == c, probs[:, c]),
        }
    return rows


def _per_class_multilabel(y, probs, dec, class_names):
    rows = {}
    for c, name in enumerate(class_names):
        tp, fp, fn, _ = _binary_counts(y[:, c], dec[:, c])
        rows[name] = {
            "support": lambda tp=tp, fn=fn: tp + fn,
            "precision": lambda tp=tp, fp=fp: _ratio(tp, tp + fp, "never predicted"),
            "recall": lambda tp=tp, fn=fn: _ratio(tp, tp + fn, "no positives in the split"),
            "f1": lambda tp=tp, fp=fp, fn=fn: f1_from_counts(tp, fp, fn),
            "auc": lambda c=c: auc(y[:, c], probs[:, c]),
            "average_precision": lambda c=c: average_precision(y[:, c], probs[:, c]),
        }
    return rows


# --------------------------------------------------------------------------- entry point

def _evaluate(fns: dict, undefined: dict, prefix: str = "") -> dict:
    """Calls each zero-argument metric; Undefined -> None, reason recorded under prefix+name."""
    out = {}
    for name, fn in fns.items():
        try:
            out[name] = fn()
        except Undefined as e:
            out[name] = None
            undefined[prefix + name] = str(e)
    return out


def _safe(stat: Callable[[np.ndarray], float]) -> bootstrap.Statistic:
    def wrapped(idx):
        try:
            return stat(idx)
        except Undefined:
            return None
    return wrapped


def _prepare(task, y_true, probs, decisions):
    if task == "multilabel":
        return (np.asarray(y_true).astype(np.int64), np.asarray(probs, np.float64),
                np.asarray(decisions).astype(np.int64))
    probs = binary_probs(probs) if task == "binary" else np.asarray(probs, np.float64)
    return (np.asarray(y_true).astype(np.int64).reshape(-1), probs,
            np.asarray(decisions).astype(np.int64).reshape(-1))


def compute_metrics(task: str, y_true, probs, decisions, class_names: Sequence[str],
                    patient_ids=None, n_boot: int = 1000, seed: int = 0,
                    referable_grade: int = REFERABLE_GRADE) -> dict:
    """Metrics of one split (shapes in the module docstring).

    Args:
        task: "dr_grade" | "binary" | "multiclass" | "multilabel".
        y_true, probs, decisions: see the module docstring; `decisions` are the final
            (thresholded) predictions, so tuned thresholds are what gets measured.
        class_names: K (or C) names; for binary, the names of classes 0 and 1.
        patient_ids: [N] ids for the patient-level bootstrap; None, or every id "" (the
            source has none: APTOS, IDRiD, RetinaMNIST...) = image level.
        n_boot: bootstrap replicates for the headline CIs (0 = no CIs).
        seed: bootstrap seed.
        referable_grade: dr_grade only; "referable" = grade >= this. Referable AUC uses
            P(referable) = sum of P(grade >= referable_grade); referable sensitivity and
            specificity use the decided grade, i.e. the referral the system makes.
            Also for dr_grade: `macro_auc` (one-vs-rest over grades, as MedMNIST reports
            AUC), `any_dr_auc` (grade >= 1 scored by 1 - P(grade 0)) and
            `argmax_accuracy` (top-1 of `probs`, MedMNIST's ACC; `accuracy` is that of
            `decisions`, the tuned ordinal rule).

    Returns:
        JSON-ready dict: task, class_names, num_examples, num_patients (None without ids),
        ci_unit ("patient" | "image": what the bootstrap resamples), headline (names),
        metrics (name -> float | None), confidence_intervals (headline name -> CI dict),
        per_class (name -> metric -> value), confusion_matrix (single-label, [K, K] lists,
        rows = truth) or label_confusion (multilabel: name -> tp/fp/fn/tn),
        undefined (metric key -> reason; per-class keys are "per_class/<name>/<metric>").
    """
    y, p, d = _prepare(task, y_true, probs, decisions)
    n, k = len(y), len(class_names)
    if patient_ids is not None and not np.any(np.asarray(patient_ids).astype(str) != ""):
        patient_ids = None  # no ids at all: each image is its own cluster, say so
    undefined: dict[str, str] = {}
    if task == "dr_grade":
        stats = _stats_dr_grade(y, p, d, k, referable_grade)
    elif task == "binary":
        stats = _stats_binary(y, p, d)
    elif task == "multiclass":
        stats = _stats_multiclass(y, p, d, k)
    elif task == "multilabel":
        stats = _stats_multilabel(y, p, d)
    else:
        raise ValueError(f"Unknown task {task!r}; known tasks: {', '.join(HEADLINE)}")
    all_idx = np.arange(n)
    result = {
        "task": task,
        "class_names": list(class_names),
        "num_examples": int(n),
        "num_patients": (None if patient_ids is None
                         else int(len(bootstrap.patient_groups(n, patient_ids)[1]))),
        "ci_unit": "image" if patient_ids is None else "patient",
        "headline": list(HEADLINE[task]),
        "metrics": _evaluate({name: (lambda s=s: s(all_idx)) for name, s in stats.items()},
                             undefined),
    }
    if task == "multilabel":
        rows = _per_class_multilabel(y, p, d, class_names)
        result["label_confusion"] = {
            name: dict(zip(("tp", "fp", "fn", "tn"), _binary_counts(y[:, c], d[:, c]),
                           strict=True))
            for c, name in enumerate(class_names)}
    else:
        cm = confusion_matrix(y, d, k)
        probs_k = np.stack([1 - p, p], 1) if task == "binary" else p
        rows = _per_class_single_label(y, probs_k, cm, class_names)
        result["confusion_matrix"] = cm.tolist()
    result["per_class"] = {name: _evaluate(fns, undefined, f"per_class/{name}/")
                           for name, fns in rows.items()}
    result["confidence_intervals"] = {}
    if n_boot > 0:
        result["confidence_intervals"] = bootstrap.bootstrap_ci(
            {name: _safe(stats[name]) for name in HEADLINE[task]}, n, patient_ids,
            n_boot=n_boot, seed=seed)
    result["undefined"] = undefined
    return result


# --------------------------------------------------------------------------- curves

def _curve_scores(task, y, p, class_names, referable_grade):
    """name -> (0/1 truth [N], score [N]) for each one-vs-rest curve of the task."""
    if task == "dr_grade":
        return {f"referable (grade >= {referable_grade})":
                (y >= referable_grade, p[:, referable_grade:].sum(1))}
    if task == "binary":
        return {class_names[-1]: (y == 1, p)}
    if task == "multiclass":
        return {name: (y == c, p[:, c]) for c, name in enumerate(class_names)}
    return {name: (y[:, c] == 1, p[:, c]) for c, name in enumerate(class_names)}


def compute_curves(task: str, y_true, probs, class_names: Sequence[str],
                   referable_grade: int = REFERABLE_GRADE) -> dict:
    """ROC and PR curves (one-vs-rest) for the report; curves undefined on the split are skipped.

    Returns:
        {"roc": name -> {"fpr", "tpr", "auc"}, "pr": name -> {"recall", "precision", "ap"}},
        lists of floats in [0, 1].
    """
    y, p, _ = _prepare(task, y_true, probs, np.zeros(np.shape(y_true), np.int64))
    curves = {"roc": {}, "pr": {}}
    for name, (truth, score) in _curve_scores(task, y, p, class_names, referable_grade).items():
        if 0 < truth.sum() < len(truth):
            fpr, tpr, _ = roc_curve(truth, score)
            curves["roc"][name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                                   "auc": auc(truth, score)}
            prec, rec, _ = precision_recall_curve(truth, score)
            curves["pr"][name] = {"recall": rec.tolist(), "precision": prec.tolist(),
                                  "ap": average_precision(truth, score)}
    return curves

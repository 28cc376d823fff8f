"""Decision rules tuned on validation probabilities and applied unchanged to test.

A decision rule is a JSON-ready dict; `apply_rule` turns probabilities into decisions:

| task       | rule["type"]           | decision                                             |
| ---------- | ---------------------- | ---------------------------------------------------- |
| binary     | "binary_threshold"     | 1 if P(1) >= threshold                               |
| multiclass | "argmax"               | argmax_k P(k)                                        |
| dr_grade   | "ordinal_cutpoints"    | grade = #{j : E[grade] >= cutpoints[j]}, E = sum k P(k)|
| multilabel | "per_class_thresholds" | label c on if P(c) >= thresholds[c]                  |

Probabilities are the ones the deployed model outputs, i.e. after temperature scaling
when calibration is used (evaluation/run.py tunes on calibrated validation probabilities).
"""

from collections.abc import Sequence

import numpy as np

from evaluation import metrics

# 0.10, 0.15, ..., 0.90 (rounded so that 0.7 is exactly 0.7).
GRID = np.round(np.arange(0.1, 0.9 + 1e-9, 0.05), 6)


def _counts_at(y: np.ndarray, p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, ...]:
    """tp, fp, fn [T] of the decision p >= t for each threshold t [T]; y 0/1 [N]; p [N]."""
    y = np.asarray(y).astype(bool)
    pos, neg = np.sort(p[y]), np.sort(p[~y])
    tp = len(pos) - np.searchsorted(pos, t, side="left")
    fp = len(neg) - np.searchsorted(neg, t, side="left")
    return tp.astype(np.float64), fp.astype(np.float64), len(pos) - tp.astype(np.float64)


def _f1(tp, fp, fn):
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros_like(den), where=den > 0)


def _first_max(x: np.ndarray) -> int:
    """Index of the first maximum, treating values within 1e-12 as ties (float noise)."""
    return int(np.flatnonzero(x >= x.max() - 1e-12)[0])


def label_threshold(y: np.ndarray, p: np.ndarray, grid: np.ndarray = GRID,
                    min_recall: float = 0.3, max_threshold: float = 0.7,
                    fallback: float = 0.5) -> dict:
    """F1-optimal threshold of one label among `grid`, as the RFMiD winning system did.

    Candidates above `max_threshold` or with recall < `min_recall` are rejected (a high
    threshold that wins F1 on a few validation positives tends to miss most test
    positives). Ties on F1 go to the lowest threshold (favours recall).

    Args:
        y: 0/1 [N] validation labels; p: float [N] in [0, 1] probabilities.

    Returns:
        {"threshold", "f1", "precision", "recall", "reason"}; reason is None when tuned,
        else why `fallback` was used (metrics are then those of the fallback).
    """
    y, p = np.asarray(y).astype(bool), np.asarray(p, np.float64)
    t = np.asarray(grid, np.float64)
    tp, fp, fn = _counts_at(y, p, t)
    reason = None
    if y.sum() == 0:
        reason = "no positives in validation"
    else:
        ok = (t <= max_threshold + 1e-12) & (tp / (tp + fn) >= min_recall)
        if not ok.any():
            reason = f"no threshold <= {max_threshold} reaches recall >= {min_recall}"
    if reason is None:
        f1 = np.where(ok, _f1(tp, fp, fn), -1.0)
        best = _first_max(f1)
        chosen = float(t[best])
    else:
        chosen = fallback
    tp, fp, fn = (float(a[0]) for a in _counts_at(y, p, np.array([chosen])))
    return {"threshold": chosen, "f1": float(_f1(np.float64(tp), fp, fn)),
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None, "reason": reason}


def multilabel_rule(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                    **kw) -> dict:
    """Per-label thresholds (see `label_threshold`); y 0/1 [N, C], probs float [N, C]."""
    y, probs = np.asarray(y), np.asarray(probs, np.float64)
    details = {name: label_threshold(y[:, c], probs[:, c], **kw)
               for c, name in enumerate(class_names)}
    return {"type": "per_class_thresholds",
            "thresholds": [details[n]["threshold"] for n in class_names],
            "class_names": list(class_names), "details": details}


def binary_rule(y: np.ndarray, p: np.ndarray, criterion: str = "f1",
                fallback: float = 0.5) -> dict:
    """Threshold on P(1) maximising F1 or Youden's J = sensitivity + specificity - 1.

    Candidates are the distinct validation probabilities (decision p >= t); ties go to
    the highest threshold. Both optima are reported; `criterion` picks the one applied.

    Args:
        y: 0/1 [N]; p: float [N] in [0, 1] P(class 1).

    Returns:
        {"type": "binary_threshold", "threshold", "criterion", "f1": {"threshold", "value"},
         "youden": {"threshold", "value"}, "reason"}.
    """
    if criterion not in ("f1", "youden"):
        raise ValueError(f"criterion must be 'f1' or 'youden', got {criterion!r}")
    y, p = np.asarray(y).astype(bool), np.asarray(p, np.float64).reshape(-1)
    rule = {"type": "binary_threshold", "criterion": criterion, "reason": None}
    if y.all() or not y.any():
        rule.update(threshold=fallback, f1=None, youden=None,
                    reason="validation has a single class; threshold not tuned")
        return rule
    t = np.unique(p)[::-1]  # descending: the first maximum is the highest tied threshold
    tp, fp, fn = _counts_at(y, p, t)
    youden = tp / y.sum() - fp / (~y).sum()
    f1 = _f1(tp, fp, fn)
    i_f1, i_j = _first_max(f1), _first_max(youden)
    rule["f1"] = {"threshold": float(t[i_f1]), "value": float(f1[i_f1])}
    rule["youden"] = {"threshold": float(t[i_j]), "value": float(youden[i_j])}
    rule["threshold"] = rule[criterion]["threshold"]
    return rule


def expected_grade(probs: np.ndarray) -> np.ndarray:
    """E[grade] = sum_k k P(k): float [N] in [0, K-1] from grade probabilities [N, K]."""
    probs = np.asarray(probs, np.float64)
    return probs @ np.arange(probs.shape[1])


def apply_cutpoints(score: np.ndarray, cutpoints: Sequence[float]) -> np.ndarray:
    """Grade = number of cut-points <= score: int64 [N] in 0..len(cutpoints)."""
    return (np.asarray(score)[:, None] >= np.asarray(cutpoints)[None, :]).sum(1).astype(np.int64)


def _qwk(y, score, cuts, k):
    try:
        return metrics.qwk(metrics.confusion_matrix(y, apply_cutpoints(score, cuts), k))
    except metrics.Undefined:
        return -np.inf


def ordinal_rule(y: np.ndarray, probs: np.ndarray, step: float = 0.05,
                 max_passes: int = 20) -> dict:
    """Cut-points on the expected grade tuned for QWK by coordinate search.

    Starts from the rounding cut-points [0.5, 1.5, ..., K-1.5]. Each pass scans every
    cut-point over a `step` grid strictly between its neighbours (so they stay strictly
    increasing) and moves it to the best QWK; among tied values the current one is kept,
    else the middle of the tied values (further from the data on either side). Stops
    when a pass changes nothing.

    Args:
        y: int [N] grades 0..K-1; probs: float [N, K] grade probabilities.

    Returns:
        {"type": "ordinal_cutpoints", "score": "expected_grade", "cutpoints": [K-1 floats],
         "qwk_default", "qwk_tuned", "reason"}.
    """
    y = np.asarray(y, np.int64)
    k = np.shape(probs)[1]
    score = expected_grade(probs)
    cuts = np.arange(k - 1) + 0.5
    qwk_default = _qwk(y, score, cuts, k)
    best = qwk_default
    for _ in range(max_passes):
        moved = False
        for j in range(k - 1):
            lo = cuts[j - 1] + step if j > 0 else 0.0
            hi = cuts[j + 1] - step if j < k - 2 else k - 1.0
            cand = np.round(np.arange(lo, hi + 1e-9, step), 6)
            scores = np.array([_qwk(y, score, np.r_[cuts[:j], c, cuts[j + 1:]], k)
                               for c in cand])
            if len(cand) == 0 or scores.max() <= best + 1e-12:
                continue
            tied = cand[scores >= scores.max() - 1e-12]
            cuts[j], best, moved = tied[len(tied) // 2], scores.max(), True
        if not moved:
            break
    undefined = not np.isfinite(qwk_default) and not np.isfinite(best)
    return {"type": "ordinal_cutpoints", "score": "expected_grade",
            "cutpoints": [float(c) for c in cuts],
            "qwk_default": float(qwk_default) if np.isfinite(qwk_default) else None,
            "qwk_tuned": float(best) if np.isfinite(best) else None,
            "reason": "QWK undefined on validation; default cut-points" if undefined else None}


def tune_rule(task: str, y: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
              binary_criterion: str = "f1", **multilabel_kw) -> dict:
    """The decision rule of `task` tuned on validation labels y and probabilities."""
    if task == "binary":
        return binary_rule(y, metrics.binary_probs(probs), binary_criterion)
    if task == "dr_grade":
        return ordinal_rule(y, probs)
    if task == "multilabel":
        return multilabel_rule(y, probs, class_names, **multilabel_kw)
    if task == "multiclass":
        return {"type": "argmax"}
    raise ValueError(f"Unknown task {task!r}")


def apply_rule(rule: dict, probs: np.ndarray) -> np.ndarray:
    """Decisions from probabilities (shapes as in evaluation.metrics): int64 [N] or [N, C]."""
    kind = rule["type"]
    if kind == "binary_threshold":
        return (metrics.binary_probs(probs) >= rule["threshold"]).astype(np.int64)
    if kind == "argmax":
        return np.argmax(probs, axis=1).astype(np.int64)
    if kind == "ordinal_cutpoints":
        return apply_cutpoints(expected_grade(probs), rule["cutpoints"])
    if kind == "per_class_thresholds":
        return (np.asarray(probs) >= np.asarray(rule["thresholds"])[None, :]).astype(np.int64)
    raise ValueError(f"Unknown decision rule {kind!r}")

"""Decision rules: probabilities -> decisions, one definition for training, evaluation, serving.

A decision rule is a JSON-ready dict. The same ``apply_rule`` turns probabilities into
decisions in the training metrics that select the best checkpoint (models/metrics.py), in
``evaluate.py`` (numpy in, numpy out) and inside the exported graph (keras tensors):

| task       | rule["type"]           | decision                                              |
| ---------- | ---------------------- | ----------------------------------------------------- |
| binary     | "binary_threshold"     | 1 if P(1) >= threshold                                |
| multiclass | "argmax"               | first k with P(k) = max_j P(j)                        |
| dr_grade   | "ordinal_cutpoints"    | grade = #{j : E[grade] >= cutpoints[j]}, E = sum k P(k) |
| multilabel | "per_class_thresholds" | label c on if P(c) >= thresholds[c]                   |

Probabilities are ``models.heads.probabilities`` of the (temperature-scaled) logits, so the
rule does not depend on the head: sigmoid, two-way softmax, K-way softmax, CORAL, CORN and
multilabel sigmoid all go through the same function (``decide``).

Untuned default (``default_rule``), used by the training metrics and by an export without
thresholds.json: threshold 0.5, argmax, and for dr_grade the expected grade rounded, i.e.
cut-points k + 0.5, for every ordinal head (softmax, CORAL, CORN). Why the expected grade and
not "count of P(y > k) > 0.5" (the median grade):
- QWK, the headline grading metric, penalises a disagreement by its squared distance; the
  grade minimising the expected squared error is the mean of the predicted distribution, so
  E[grade] is the score QWK rewards (the median minimises the absolute error instead);
- the tuned rule (``ordinal_rule``) moves these same cut-points, so the checkpoint selected
  in training, the default and the tuned decision are one family; the default is the
  tuner's starting point;
- it uses the whole distribution, hence is smooth in the logits, whereas the count rule
  ignores how far each cumulative probability is from 0.5.
Example: CORAL P(y > k) = (.9, .45, .45, .45) gives class probabilities (.1, .45, 0, 0, .45),
E[grade] = 2.25 -> grade 2 (the count rule would say 1).

Every rule value is compared in float32 (the dtype of the served graph), so numpy
evaluation and the graph decide identically on identical probabilities.

Tuning (numpy, on validation labels and probabilities): ``binary_rule`` (F1 or Youden),
``multilabel_rule`` / ``label_threshold`` (per-label F1 with min recall and max threshold,
as the RFMiD winning system), ``ordinal_rule`` (QWK-optimal cut-points), ``tune_rule``.
This module uses numpy and keras.ops only (no TensorFlow), so training code on any backend
can tune and apply rules, e.g. per epoch.
"""

from collections.abc import Sequence

import numpy as np
from keras import ops

from models import heads

RULE_TYPES = {"binary": "binary_threshold", "multiclass": "argmax",
              "dr_grade": "ordinal_cutpoints", "multilabel": "per_class_thresholds"}

# 0.10, 0.15, ..., 0.90 (rounded so that 0.7 is exactly 0.7).
GRID = np.round(np.arange(0.1, 0.9 + 1e-9, 0.05), 6)


# ----------------------------------------------------------------------------- rules


def default_rule(task: str, num_classes: int) -> dict:
    """The untuned rule of ``task`` (see the module docstring for the dr_grade choice)."""
    if task == "binary":
        return {"type": "binary_threshold", "threshold": 0.5}
    if task == "multiclass":
        return {"type": "argmax"}
    if task == "dr_grade":
        return {"type": "ordinal_cutpoints", "score": "expected_grade",
                "cutpoints": [k + 0.5 for k in range(num_classes - 1)]}
    if task == "multilabel":
        return {"type": "per_class_thresholds", "thresholds": [0.5] * num_classes}
    raise ValueError(f"Unknown task {task!r}; known tasks: {list(RULE_TYPES)}")


def check_rule(rule, task: str, num_classes: int, where: str = "decision rule") -> dict:
    """``rule`` if it is a rule of ``task`` for ``num_classes`` classes; else ValueError naming
    ``where`` (e.g. the thresholds.json path)."""
    want = RULE_TYPES.get(task)
    if not isinstance(rule, dict) or rule.get("type") != want:
        raise ValueError(f"{where}: expected a {want!r} decision rule for task {task!r}, "
                         f"got {rule!r}")
    sizes = {"ordinal_cutpoints": ("cutpoints", num_classes - 1),
             "per_class_thresholds": ("thresholds", num_classes)}
    if want in sizes:
        key, n = sizes[want]
        if len(rule.get(key) or []) != n:
            raise ValueError(f"{where}: {key} has {len(rule.get(key) or [])} values, the model "
                             f"has {num_classes} classes (needs {n})")
    return rule


def expected_grade(probs):
    """E[grade] = sum_k k P(k): float32 [N] in [0, K-1] from grade probabilities [N, K]."""
    p = ops.cast(ops.convert_to_tensor(probs), "float32")
    grades = ops.cast(ops.arange(p.shape[-1]), "float32")
    return _like(ops.sum(p * grades[None, :], axis=-1), probs)


def apply_rule(rule: dict, probs):
    """Decisions from probabilities; numpy in -> numpy out, tensors in -> tensors out.

    Args:
        rule: a rule dict (module table).
        probs: float [N, K] class probabilities (binary: [N, 2], [N, 1] or [N] P(1)), or
            [N, C] per-label probabilities (multilabel). Cast to float32.

    Returns:
        int32 [N] (binary / multiclass / dr_grade) or 0/1 int32 [N, C] (multilabel).
    """
    p = ops.cast(ops.convert_to_tensor(probs), "float32")
    kind = rule["type"]
    if kind == "binary_threshold":
        p1 = p[:, -1] if len(p.shape) == 2 else p
        out = ops.cast(p1 >= _f32(rule["threshold"]), "int32")
    elif kind == "argmax":
        out = _first_argmax(p)
    elif kind == "ordinal_cutpoints":
        score = expected_grade(p)
        cuts = _f32(rule["cutpoints"])
        out = ops.sum(ops.cast(score[:, None] >= cuts[None, :], "int32"), axis=-1)
    elif kind == "per_class_thresholds":
        out = ops.cast(p >= _f32(rule["thresholds"])[None, :], "int32")
    else:
        raise ValueError(f"Unknown decision rule {kind!r}")
    return _like(out, probs)


def decide(logits, head: str, rule: dict, temperature=1.0) -> dict:
    """The served post-processing: logits -> {"probabilities", "decision"}.

    Args:
        logits: float [N, D] logits of ``head`` (models.heads).
        head: "sigmoid" | "softmax" | "coral" | "corn".
        rule: a rule dict.
        temperature: T > 0, scalar or [D] (per-label multilabel); the logits are divided
            by it in float32.

    Returns:
        {"probabilities": float32 [N, K] (or [N, C]), "decision": int32 [N] (or [N, C])};
        numpy when ``logits`` is numpy.
    """
    x = ops.cast(ops.convert_to_tensor(logits), "float32") / _f32(temperature)
    probs = heads.probabilities(x, head)
    out = {"probabilities": probs, "decision": apply_rule(rule, probs)}
    return {k: _like(v, logits) for k, v in out.items()}


def flip_views(images) -> list:
    """TTA views of [B, S, S, 3] images: identity, horizontal flip, vertical flip."""
    return [images, ops.flip(images, axis=2), ops.flip(images, axis=1)]


def served_logits(model, images, tta: bool = False):
    """The model's logits [B, D] as served: with ``tta``, the mean logits of ``flip_views``.

    Averaging logits (not probabilities) keeps one rule for every head: temperature and
    decision then work on the averaged logits exactly as on a single view.
    """
    if not tta:
        return model(images, training=False)
    outs = [ops.cast(model(v, training=False), "float32") for v in flip_views(images)]
    return (outs[0] + outs[1] + outs[2]) / 3.0


def _f32(values):
    return ops.convert_to_tensor(np.asarray(values, np.float32))


def _like(x, reference):
    """x as numpy when ``reference`` is numpy (or a list), else unchanged."""
    return ops.convert_to_numpy(x) if isinstance(reference, np.ndarray | list) else x


def _first_argmax(probs):
    """int32 [B]: index of the first maximum of [B, K], as np.argmax.

    Not ops.argmax: on TF, Keras implements it with a Bitcast (to order -0.0
    and 0.0) that ONNX cannot hold.
    """
    k = probs.shape[-1]
    is_max = probs >= ops.max(probs, axis=-1, keepdims=True)
    reverse_index = ops.cast(k - ops.arange(k), "int32")[None, :]  # K .. 1
    return k - ops.max(ops.where(is_max, reverse_index, 0), axis=-1)


# ----------------------------------------------------------------------------- scores


class Undefined(ValueError):
    """Raised by a metric that is undefined on its input; the message is the reason."""


def binary_probs(probs) -> np.ndarray:
    """P(class 1) float64 [N] from [N], [N, 1] or [N, 2] probabilities."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim == 2:
        probs = probs[:, -1]  # [N, 1] -> P(1); [N, 2] -> column of class 1
    return probs


def confusion_matrix(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """int64 [K, K]; rows = true class, columns = predicted class."""
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def qwk(cm: np.ndarray) -> float:
    """Quadratic weighted kappa from a [K, K] confusion matrix; Undefined when it is."""
    k = cm.shape[0]
    n = cm.sum()
    if n == 0:
        raise Undefined("no examples")
    i = np.arange(k)
    w = (i[:, None] - i[None, :]) ** 2 / max(k - 1, 1) ** 2
    expected = np.outer(cm.sum(1), cm.sum(0)) / n
    den = (w * expected).sum()
    if den == 0:
        raise Undefined("chance agreement is perfect (a single grade in labels and predictions)")
    return float(1.0 - (w * cm).sum() / den)


# ----------------------------------------------------------------------------- tuning


def _counts_at(y: np.ndarray, p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, ...]:
    """tp, fp, fn [T] of the decision p >= t for each threshold t [T]; y 0/1 [N]; p [N].

    p and t are compared in float32, as ``apply_rule`` does.
    """
    y = np.asarray(y).astype(bool)
    p, t = np.asarray(p, np.float32), np.asarray(t, np.float32)
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


def apply_cutpoints(score: np.ndarray, cutpoints: Sequence[float]) -> np.ndarray:
    """Grade = number of cut-points <= score (float32 comparison): int32 [N]."""
    score, cuts = np.asarray(score, np.float32), np.asarray(cutpoints, np.float32)
    return (score[:, None] >= cuts[None, :]).sum(1).astype(np.int32)


def _qwk_or_minus_inf(y, score, cuts, k):
    try:
        return qwk(confusion_matrix(y, apply_cutpoints(score, cuts), k))
    except Undefined:
        return -np.inf


def ordinal_rule(y: np.ndarray, probs: np.ndarray, step: float = 0.05,
                 max_passes: int = 20) -> dict:
    """Cut-points on the expected grade tuned for QWK by coordinate search.

    Starts from the default (rounding) cut-points [0.5, 1.5, ..., K-1.5]. Each pass scans
    every cut-point over a `step` grid strictly between its neighbours (so they stay
    strictly increasing) and moves it to the best QWK; among tied values the current one
    is kept, else the middle of the tied values (further from the data on either side).
    Stops when a pass changes nothing. The score is ``expected_grade`` (float32), the one
    ``apply_rule`` thresholds.

    Args:
        y: int [N] grades 0..K-1; probs: float [N, K] grade probabilities.

    Returns:
        {"type": "ordinal_cutpoints", "score": "expected_grade", "cutpoints": [K-1 floats],
         "qwk_default", "qwk_tuned", "reason"}.
    """
    y = np.asarray(y, np.int64)
    k = np.shape(probs)[1]
    score = expected_grade(np.asarray(probs, np.float32))
    cuts = np.asarray(default_rule("dr_grade", k)["cutpoints"], np.float64)
    qwk_default = _qwk_or_minus_inf(y, score, cuts, k)
    best = qwk_default
    for _ in range(max_passes):
        moved = False
        for j in range(k - 1):
            lo = cuts[j - 1] + step if j > 0 else 0.0
            hi = cuts[j + 1] - step if j < k - 2 else k - 1.0
            cand = np.round(np.arange(lo, hi + 1e-9, step), 6)
            scores = np.array([_qwk_or_minus_inf(y, score, np.r_[cuts[:j], c, cuts[j + 1:]], k)
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
        return binary_rule(y, binary_probs(probs), binary_criterion)
    if task == "dr_grade":
        return ordinal_rule(y, probs)
    if task == "multilabel":
        return multilabel_rule(y, probs, class_names, **multilabel_kw)
    if task == "multiclass":
        return {"type": "argmax"}
    raise ValueError(f"Unknown task {task!r}")

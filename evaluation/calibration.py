"""Temperature scaling (Guo et al. 2017, arXiv:1706.04599) and expected calibration error.

One scalar T > 0 divides the logits: probabilities = heads.probabilities(logits / T, head).
T is the 1-D minimiser of the validation negative log-likelihood (bounded search over
log T), so it never changes the argmax of a softmax or the order of any score; T > 1
softens an over-confident model. Per head:

- softmax (multiclass, dr_grade softmax, binary two-way): NLL of the true class.
- sigmoid, one logit (binary): binary cross-entropy.
- sigmoid, C logits (multilabel): mean binary cross-entropy over all labels; one T shared
  by all labels, or (`per_class=True`) one T per label, each fitted on its own column.
- coral / corn (ordinal, K-1 cumulative logits): NLL of the true grade under the class
  probabilities derived from the scaled cumulative logits.

ECE uses 15 equal-width bins. Single-label: top-label confidence (max probability) vs
accuracy of the argmax. Multilabel: every (image, label) probability vs the label's
observed frequency.
"""

import numpy as np
from scipy.optimize import minimize_scalar

from models import heads

N_BINS = 15
_LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))


def _bce(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy from logits (stable form)."""
    x = np.asarray(logits, np.float64)
    return float(np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))))


def _is_multilabel(logits: np.ndarray, head: str) -> bool:
    return head == "sigmoid" and logits.shape[-1] > 1


def nll(logits: np.ndarray, y: np.ndarray, head: str) -> float:
    """Mean NLL of labels y (int [N], or 0/1 [N, C] for multilabel) under logits [N, D]."""
    logits = np.asarray(logits, np.float64)
    if head == "sigmoid":
        y = np.asarray(y, np.float64).reshape(logits.shape)
        return _bce(logits, y)
    if head == "softmax":
        z = logits - logits.max(-1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    else:  # ordinal: the head's own decoding, as the deployed model computes it
        log_p = np.log(np.maximum(np.asarray(heads.probabilities(logits, head), np.float64),
                                  1e-12))
    y = np.asarray(y, np.int64).reshape(-1)
    return float(-np.mean(log_p[np.arange(len(y)), y]))


def _fit_one(logits: np.ndarray, y: np.ndarray, head: str) -> float:
    res = minimize_scalar(lambda log_t: nll(logits / np.exp(log_t), y, head),
                          bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def fit_temperature(logits: np.ndarray, y: np.ndarray, head: str,
                    per_class: bool = False) -> float | list[float]:
    """T minimising validation NLL (in [0.05, 20]).

    Args:
        logits: float [N, D] validation logits of the model's head.
        y: int [N] class / grade, or 0/1 [N, C] (multilabel).
        head: "softmax" | "sigmoid" | "coral" | "corn" (models.heads).
        per_class: multilabel only: one T per label ([C] list) instead of one shared T.
    """
    logits = np.asarray(logits, np.float64)
    if per_class:
        if not _is_multilabel(logits, head):
            raise ValueError("per_class temperatures apply to multilabel sigmoid heads only")
        y = np.asarray(y, np.float64)
        return [_fit_one(logits[:, c:c + 1], y[:, c:c + 1], head) for c in range(y.shape[1])]
    return _fit_one(logits, y, head)


def apply_temperature(logits: np.ndarray, temperature: float | list[float]) -> np.ndarray:
    """logits / T (T scalar, or [D] per column): float64 [N, D]."""
    return np.asarray(logits, np.float64) / np.asarray(temperature, np.float64)


def reliability(probs: np.ndarray, y: np.ndarray, multilabel: bool,
                n_bins: int = N_BINS) -> dict:
    """Reliability bins and ECE.

    Args:
        probs: float [N, K] class probabilities, or [N, C] per-label (multilabel).
        y: int [N] classes, or 0/1 [N, C].
        multilabel: see the module docstring for what is binned.

    Returns:
        {"ece": float in [0, 1], "bins": [{"lo", "hi", "count", "confidence", "accuracy"}]}
        (confidence/accuracy None for empty bins).
    """
    probs = np.asarray(probs, np.float64)
    if multilabel:
        conf, hit = probs.ravel(), np.asarray(y, np.float64).ravel()
    else:
        conf = probs.max(1)
        hit = (probs.argmax(1) == np.asarray(y).reshape(-1)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        m = which == b
        count = int(m.sum())
        c = float(conf[m].mean()) if count else None
        a = float(hit[m].mean()) if count else None
        if count:
            ece += count / len(conf) * abs(c - a)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
                     "confidence": c, "accuracy": a})
    return {"ece": float(ece), "bins": bins}


def calibrate(val_logits: np.ndarray | None, val_y: np.ndarray | None, head: str,
              test_logits: np.ndarray | None = None, test_y: np.ndarray | None = None,
              per_class: bool = False, temperature: float | list[float] | None = None) -> dict:
    """Fits T on validation (or takes the given `temperature`, e.g. the served one);
    reports NLL and ECE before/after on validation (when given) and test.

    Returns:
        {"head", "temperature" (float or [C]), "per_class", "fitted" (bool), "nll": {split:
        {before, after}}, "ece": {split: {before, after}}, "reliability": {split: {before,
        after}}} where each reliability entry is `reliability(...)["bins"]`.
    """
    fitted = temperature is None
    t = fit_temperature(val_logits, val_y, head, per_class) if fitted else temperature
    splits = {}
    if val_logits is not None:
        splits["val"] = (val_logits, val_y)
    if test_logits is not None:
        splits["test"] = (test_logits, test_y)
    multilabel = _is_multilabel(np.asarray(next(iter(splits.values()))[0]), head)
    out = {"head": head, "temperature": t, "per_class": per_class, "fitted": fitted,
           "nll": {}, "ece": {}, "reliability": {}}
    for split, (logits, y) in splits.items():
        out["nll"][split], out["ece"][split], out["reliability"][split] = {}, {}, {}
        for when, scaled in (("before", np.asarray(logits, np.float64)),
                             ("after", apply_temperature(logits, t))):
            rel = reliability(heads.probabilities(scaled, head), y, multilabel)
            out["nll"][split][when] = nll(scaled, y, head)
            out["ece"][split][when] = rel["ece"]
            out["reliability"][split][when] = rel["bins"]
    return out

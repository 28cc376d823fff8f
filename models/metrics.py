"""Streaming training metrics on logits, usable in ``fit`` (jit-compiled, TF and JAX).

Every metric takes the model's float32 logits ``[B, D]`` and the labels (int ``[B]`` for
single-label tasks, float 0/1 ``[B, C]`` for multilabel) and accumulates state with
``assign_add`` (a plain function metric would be averaged per batch: docs PITFALLS 5).
Single-label metrics decide with ``models.decision``'s untuned default rule of the task
(threshold 0.5, argmax, dr_grade: expected grade with cut-points k + 0.5 for every head),
the same function evaluate.py and the export graph apply, so the checkpoint is selected by
the rule that is later tuned and served. Stable names, so training can monitor e.g.
``val_qwk``:

| task         | metrics (``get_metrics``)              |
|--------------|----------------------------------------|
| `binary`     | accuracy, auc, map, macro_f1           |
| `multiclass` | accuracy, auc (one-vs-rest), macro_f1  |
| `dr_grade`   | qwk, accuracy, macro_f1                |
| `multilabel` | auc, map, macro_f1                     |

``auc``/``map`` are Keras' thresholded AUC (200 thresholds; ``map`` is the PR-AUC, an
approximation of average precision); exact split-level values live in ``evaluation/``.
"""

import keras
from keras import ops

from models import decision, heads


def _sparse_labels(y_true):
    return ops.cast(ops.reshape(y_true, (-1,)), "int32")


def _column_weights(sample_weight):
    """``[B]`` sample weights as a float32 ``[B, 1]`` column, or 1.0."""
    if sample_weight is None:
        return 1.0
    return ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1))


def _single_label_task(task: str | None, head: str, num_classes: int) -> str:
    """``task``, or the one a bare (head, K) implies: ordinal heads grade, K = 2 is binary."""
    if head == "sigmoid" and num_classes != 2:
        raise ValueError("a sigmoid head is single-label only when binary (num_classes=2)")
    if task is not None:
        return task
    if head in heads.ORDINAL_HEADS:
        return "dr_grade"
    return "binary" if num_classes == 2 else "multiclass"


def _decide(logits, head: str, rule: dict):
    """int32 decisions of ``models.decision`` (untempered logits)."""
    return decision.decide(logits, head, rule)["decision"]


class _ConfusionMatrixMetric(keras.metrics.Metric):
    """Accumulates the K x K confusion matrix (rows: true class, columns: decided class)."""

    def __init__(self, num_classes: int, head: str = "softmax", task: str | None = None,
                 name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = num_classes
        self.head = head
        self.task = _single_label_task(task, head, num_classes)
        self.rule = decision.default_rule(self.task, num_classes)
        self.confusion = self.add_variable(
            shape=(num_classes, num_classes),
            initializer="zeros",
            dtype="float32",
            aggregation="sum",
            name="confusion",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        k = self.num_classes
        true = ops.one_hot(_sparse_labels(y_true), k, dtype="float32")
        pred = ops.one_hot(_decide(y_pred, self.head, self.rule), k, dtype="float32")
        true = true * _column_weights(sample_weight)
        self.confusion.assign_add(ops.matmul(ops.transpose(true), pred))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "head": self.head,
                "task": self.task}


@keras.saving.register_keras_serializable(package="fundusflow")
class QWK(_ConfusionMatrixMetric):
    """Quadratic-weighted Cohen's kappa over everything seen since the last reset.

    kappa = 1 - sum(W * O) / sum(W * E), W_ij = (i - j)^2, O the confusion matrix,
    E = outer(row sums, column sums) / n. Equals ``sklearn.metrics.cohen_kappa_score(
    weights="quadratic", labels=range(K))``; 0 where that is undefined (no data, or one
    class only). Predictions: ``models.decision.default_rule(task, K)`` on the head's
    probabilities (for every dr_grade head: expected grade, cut-points k + 0.5).
    """

    def __init__(self, num_classes: int = 5, head: str = "softmax", task: str = "dr_grade",
                 name="qwk", dtype=None):
        super().__init__(num_classes, head, task, name=name, dtype=dtype)

    def result(self):
        grades = ops.arange(self.num_classes, dtype="float32")
        weights = ops.square(grades[:, None] - grades[None, :])
        observed = self.confusion
        total = ops.sum(observed)
        expected = ops.outer(ops.sum(observed, 1), ops.sum(observed, 0)) / ops.maximum(total, 1.0)
        denominator = ops.sum(weights * expected)
        kappa = 1.0 - ops.sum(weights * observed) / ops.maximum(denominator, 1e-12)
        return ops.where(denominator > 0, kappa, 0.0)


@keras.saving.register_keras_serializable(package="fundusflow")
class MacroF1(_ConfusionMatrixMetric):
    """Macro-averaged F1 of single-label predictions (decoded as in ``QWK``).

    F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k), averaged over the classes that occur in the labels
    or the predictions seen so far: ``sklearn.metrics.f1_score(average="macro")``'s default.
    """

    def __init__(self, num_classes: int = 2, head: str = "softmax", task: str | None = None,
                 name="macro_f1", dtype=None):
        super().__init__(num_classes, head, task, name=name, dtype=dtype)

    def result(self):
        true_positives = ops.diagonal(self.confusion)
        # 2TP + FP + FN = (# labelled k) + (# predicted k).
        denominator = ops.sum(self.confusion, 0) + ops.sum(self.confusion, 1)
        present = ops.cast(denominator > 0, "float32")
        f1 = 2.0 * true_positives / ops.maximum(denominator, 1e-12)
        return ops.sum(f1 * present) / ops.maximum(ops.sum(present), 1.0)


@keras.saving.register_keras_serializable(package="fundusflow")
class MultilabelMacroF1(keras.metrics.Metric):
    """Macro F1 over C labels decided by ``models.decision`` with every threshold at
    ``threshold`` (P(label) >= threshold); labels with no positives and no predictions count
    0 (``sklearn f1_score(average="macro", zero_division=0)``)."""

    def __init__(self, num_labels: int, threshold: float = 0.5, name="macro_f1", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_labels = num_labels
        self.threshold = threshold
        # Rows: true positives, false positives, false negatives; one column per label.
        self.counts = self.add_variable(
            shape=(3, num_labels), initializer="zeros", dtype="float32", name="counts"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y = ops.cast(y_true, "float32")
        rule = {"type": "per_class_thresholds", "thresholds": [self.threshold] * self.num_labels}
        pred = ops.cast(_decide(y_pred, "sigmoid", rule), "float32")
        w = _column_weights(sample_weight)
        batch = ops.stack(
            [
                ops.sum(w * y * pred, 0),
                ops.sum(w * (1.0 - y) * pred, 0),
                ops.sum(w * y * (1.0 - pred), 0),
            ]
        )
        self.counts.assign_add(batch)

    def result(self):
        tp, fp, fn = self.counts[0], self.counts[1], self.counts[2]
        f1 = 2.0 * tp / ops.maximum(2.0 * tp + fp + fn, 1e-12)
        return ops.mean(f1)

    def get_config(self):
        config = {"num_labels": self.num_labels, "threshold": self.threshold}
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="fundusflow")
class DecodedAccuracy(keras.metrics.Mean):
    """Fraction of examples whose decision (``models.decision``'s default rule, as in
    ``QWK``) equals the label: the accuracy of any single-label head, ordinal ones included.
    """

    def __init__(self, num_classes: int, head: str = "softmax", task: str | None = None,
                 name="accuracy", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.head = head
        self.num_classes = num_classes
        self.task = _single_label_task(task, head, num_classes)
        self.rule = decision.default_rule(self.task, num_classes)

    def update_state(self, y_true, y_pred, sample_weight=None):
        hits = ops.cast(_decide(y_pred, self.head, self.rule) == _sparse_labels(y_true),
                        "float32")
        return super().update_state(hits, sample_weight=sample_weight)

    def get_config(self):
        return {**super().get_config(), "head": self.head, "num_classes": self.num_classes,
                "task": self.task}


@keras.saving.register_keras_serializable(package="fundusflow")
class HeadAUC(keras.metrics.AUC):
    """Keras' AUC (ROC or PR) on the probabilities of a head's logits.

    - binary (``num_classes=2``): AUC of P(y = 1) (either binary head);
    - multilabel: mean over the C labels of the per-label AUC of sigmoid(logits);
    - otherwise: one-vs-rest, mean over K classes of the AUC of P(y = k).
    """

    def __init__(
        self,
        num_classes: int = 2,
        head: str = "sigmoid",
        multilabel: bool = False,
        curve: str = "ROC",
        num_thresholds: int = 200,
        name="auc",
        dtype=None,
    ):
        per_label = multilabel or num_classes > 2
        super().__init__(
            num_thresholds=num_thresholds,
            curve=curve,
            name=name,
            dtype=dtype,
            multi_label=per_label,
            num_labels=num_classes if per_label else None,
        )
        self.num_classes = num_classes
        self.head = head
        self.multilabel = multilabel

    def update_state(self, y_true, y_pred, sample_weight=None):
        if self.multilabel:
            targets = ops.cast(y_true, "float32")
            probs = ops.sigmoid(ops.cast(y_pred, "float32"))
        elif self.num_classes == 2:
            targets = ops.reshape(ops.cast(y_true, "float32"), (-1, 1))
            probs = heads.probabilities(y_pred, self.head)[:, 1:]
        else:
            targets = ops.one_hot(_sparse_labels(y_true), self.num_classes, dtype="float32")
            probs = heads.probabilities(y_pred, self.head)
        return super().update_state(targets, probs, sample_weight=sample_weight)

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "head": self.head,
            "multilabel": self.multilabel,
            "curve": self.curve.value,
            "num_thresholds": self.num_thresholds,
            "name": self.name,
            "dtype": self.dtype,
        }


def get_metrics(task: str, num_classes: int, head: str | None = None) -> list:
    """Fresh training metrics for ``task`` (see the module table); names are stable."""
    head = heads.check_head(task, head)
    if task == "binary":
        num_classes = 2  # dataset.json may say 1 or 2
    if task == "multilabel":
        return [
            HeadAUC(num_classes, head, multilabel=True, name="auc"),
            HeadAUC(num_classes, head, multilabel=True, curve="PR", name="map"),
            MultilabelMacroF1(num_classes, name="macro_f1"),
        ]
    metrics = [
        DecodedAccuracy(num_classes, head, task, name="accuracy"),
        MacroF1(num_classes, head, task, name="macro_f1"),
    ]
    if task == "dr_grade":
        return [QWK(num_classes, head, task, name="qwk"), *metrics]
    metrics.append(HeadAUC(num_classes, head, name="auc"))
    if task == "binary":
        metrics.append(HeadAUC(num_classes, head, curve="PR", name="map"))
    return metrics

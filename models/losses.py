"""Losses on logits: each a pure ``keras.ops`` function plus a serialisable ``keras.losses.Loss``.

Labels: int ``[B]`` (or ``[B, 1]``) class indices for single-label tasks, float32 ``[B, C]``
0/1 for multilabel. ``y_pred`` are the model's float32 LOGITS (see ``models.heads``).
Every pure function returns the per-example loss ``[B]``; the ``Loss`` classes then apply
``sample_weight`` and the batch reduction (default: mean over the batch).

| name           | head            | class                       |
|----------------|-----------------|-----------------------------|
| `bce`          | sigmoid         | WeightedBinaryCrossentropy  |
| `weighted_bce` | sigmoid         | WeightedBinaryCrossentropy  |
| `focal`        | sigmoid         | BinaryFocalLoss             |
| `asl`          | sigmoid         | AsymmetricLoss              |
| `ce`           | softmax         | WeightedCrossentropy        |
| `focal`        | softmax         | CategoricalFocalLoss        |
| `coral`        | coral           | CoralLoss                   |
| `corn`         | corn            | CornLoss                    |

``get_loss(name, task, head)`` picks from this table.
"""

import inspect

import gin
import keras
import numpy as np
from keras import ops

from models import heads

# ----------------------------------------------------------------------------- helpers


def _sparse_labels(y_true):
    """Class indices, int32 ``[B]`` (Keras' Loss hands them over as float32)."""
    return ops.cast(ops.reshape(y_true, (-1,)), "int32")


def _binary_targets(y_true, y_pred):
    """0/1 targets float32 in the shape of sigmoid logits: ``[B]`` -> ``[B, 1]`` for binary."""
    y = ops.cast(y_true, y_pred.dtype)
    if len(y.shape) == len(y_pred.shape) - 1:
        y = ops.expand_dims(y, -1)
    return y


def _bce_with_logits(y, logits):
    """-[y log sigmoid(x) + (1 - y) log sigmoid(-x)], elementwise; stable for large |x|."""
    return -(y * ops.log_sigmoid(logits) + (1.0 - y) * ops.log_sigmoid(-logits))


def _reduce_over_labels(values, how: str):
    if how == "mean":
        return ops.mean(values, axis=-1)
    if how == "sum":
        return ops.sum(values, axis=-1)
    raise ValueError(f"reduction_over_labels must be 'mean' or 'sum', got {how!r}")


def _vector(values):
    return None if values is None else ops.convert_to_tensor(values, "float32")


def _as_list(values):
    """JSON-friendly copy of a weight (scalar or vector) for get_config."""
    if values is None or np.ndim(values) == 0:
        return None if values is None else float(values)
    return [float(v) for v in np.ravel(values)]


# ----------------------------------------------------------------------------- pure functions


def binary_focal_loss(y_true, y_pred, gamma=2.0, alpha=0.25, reduction_over_labels="mean"):
    """Sigmoid focal loss (Lin et al. 2017, "Focal loss for dense object detection", 1708.02002).

    FL = -alpha_t (1 - p_t)^gamma log(p_t), p = sigmoid(logit), p_t = p if y = 1 else 1 - p,
    alpha_t = alpha if y = 1 else 1 - alpha (``alpha=None``: no alpha weighting).

    ``reduction_over_labels``: ``"mean"`` over the C labels like Keras' built-in
    ``BinaryFocalCrossentropy(apply_class_balancing=True)``, or ``"sum"`` like
    TF-Addons' ``SigmoidFocalCrossEntropy`` (what the RFMiD system trained with,
    gamma=2.5, alpha=0.15): ``sum`` = C x ``mean``, so the learning rate interacts with C.

    Args: y_true 0/1 ``[B]`` (binary) or ``[B, C]``; y_pred logits ``[B, 1]`` or ``[B, C]``.
    Returns: float32 ``[B]``.
    """
    y = _binary_targets(y_true, y_pred)
    p = ops.sigmoid(y_pred)
    p_t = y * p + (1.0 - y) * (1.0 - p)
    loss = ops.power(1.0 - p_t, gamma) * _bce_with_logits(y, y_pred)
    if alpha is not None:
        loss = (y * alpha + (1.0 - y) * (1.0 - alpha)) * loss
    return _reduce_over_labels(loss, reduction_over_labels)


def categorical_focal_loss(y_true, y_pred, gamma=2.0, alpha=None):
    """Softmax focal loss (Lin et al. 2017): FL = -alpha_y (1 - p_y)^gamma log p_y.

    p = softmax(logits). ``alpha``: None (no weighting), a scalar, or a per-class vector ``[K]``.
    gamma = 0 and alpha = None give the plain cross-entropy.

    Args: y_true int ``[B]``; y_pred logits ``[B, K]``. Returns: float32 ``[B]``.
    """
    onehot = ops.one_hot(_sparse_labels(y_true), y_pred.shape[-1], dtype=y_pred.dtype)
    log_p_y = ops.sum(onehot * ops.log_softmax(y_pred, axis=-1), axis=-1)
    loss = -ops.power(1.0 - ops.exp(log_p_y), gamma) * log_p_y
    if alpha is not None:
        alpha = _vector(alpha)
        loss = loss * (ops.sum(onehot * alpha, axis=-1) if len(alpha.shape) else alpha)
    return loss


def asymmetric_loss(
    y_true, y_pred, gamma_neg=4.0, gamma_pos=1.0, clip=0.05, reduction_over_labels="sum"
):
    """Asymmetric loss, ASL (Ben-Baruch/Ridnik et al. 2021, ICCV, arXiv:2009.14119).

    p = sigmoid(logit); negatives use the shifted probability p_m = max(p - clip, 0), which
    discards very easy negatives (p < clip) entirely:
        L = -[ y (1 - p)^gamma_pos log p + (1 - y) p_m^gamma_neg log(1 - p_m) ]
    summed over the C labels (the reference implementation's ``-loss.sum()``), mean over the
    batch. Unlike the reference, log p uses log_sigmoid instead of clamping p at 1e-8, and the
    focusing weights keep their gradient (the reference offers both; the value is the same).

    Args: y_true 0/1 ``[B, C]`` (or ``[B]`` for binary); y_pred logits ``[B, C]``.
    Returns: float32 ``[B]``.
    """
    y = _binary_targets(y_true, y_pred)
    p = ops.sigmoid(y_pred)
    loss_pos = y * ops.power(1.0 - p, gamma_pos) * ops.log_sigmoid(y_pred)
    if clip > 0:
        p_m = ops.maximum(p - clip, 0.0)
        log_not_p_m = ops.log(1.0 - p_m)  # 1 - p_m >= clip > 0: finite
    else:
        p_m, log_not_p_m = p, ops.log_sigmoid(-y_pred)
    loss_neg = (1.0 - y) * ops.power(p_m, gamma_neg) * log_not_p_m
    return _reduce_over_labels(-(loss_pos + loss_neg), reduction_over_labels)


def weighted_binary_crossentropy(y_true, y_pred, pos_weight=None, reduction_over_labels="mean"):
    """Binary cross-entropy with a per-label positive weight (as torch's BCEWithLogits pos_weight).

    L = -[ w_c y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)) ], w = ``pos_weight``
    (scalar or ``[C]``; None = 1, the plain BCE), then mean (Keras' convention) or sum over
    labels. See ``pos_weight_from_counts``.

    Args: y_true 0/1 ``[B]`` or ``[B, C]``; y_pred logits ``[B, 1]`` or ``[B, C]``.
    Returns: float32 ``[B]``.
    """
    y = _binary_targets(y_true, y_pred)
    w = 1.0 if pos_weight is None else _vector(pos_weight)
    loss = -(w * y * ops.log_sigmoid(y_pred) + (1.0 - y) * ops.log_sigmoid(-y_pred))
    return _reduce_over_labels(loss, reduction_over_labels)


def pos_weight_from_counts(num_examples, positives, clamp=10.0) -> np.ndarray:
    """min((N - P_c) / P_c, clamp) per label: float32 ``[C]``; labels with P_c = 0 get ``clamp``.

    The clamp keeps rare labels (a handful of positives in RFMiD) from dominating the loss.
    """
    positives = np.asarray(positives, dtype="float64")
    negatives = float(num_examples) - positives
    with np.errstate(divide="ignore"):
        ratio = np.where(positives > 0, negatives / np.maximum(positives, 1e-12), np.inf)
    return np.minimum(ratio, clamp).astype("float32")


def coral_loss(y_true, y_pred, importance_weights=None):
    """CORAL loss (Cao, Mirjalili & Raschka 2020, Pattern Recogn. Lett., arXiv:1901.07884).

    Binary cross-entropy over the K-1 cumulative tasks "y > k", summed over k with optional
    importance weights lambda_k ``[K-1]``:
        L = -sum_k lambda_k [ 1{y>k} log sigmoid(l_k) + 1{y<=k} log(1 - sigmoid(l_k)) ]

    Args: y_true int grades ``[B]`` in 0..K-1; y_pred CORAL logits ``[B, K-1]``.
    Returns: float32 ``[B]``.
    """
    levels = _levels(y_true, y_pred)
    loss = _bce_with_logits(levels, y_pred)
    if importance_weights is not None:
        loss = loss * _vector(importance_weights)
    return ops.sum(loss, axis=-1)


def corn_loss(y_true, y_pred):
    """CORN loss (Shi, Cao & Raschka 2023, "Deep neural networks for rank-consistent ordinal
    regression based on conditional probabilities", Pattern Anal. Appl., arXiv:2111.08851).

    Task k (k = 0..K-2) is trained only on the conditional subset y > k-1 (all examples for
    k = 0), with BCE on whether y > k. As in the reference (coral_pytorch ``corn_loss``) the
    loss is the mean over all used (example, task) entries:
        L = sum_{b,k} m_bk BCE(1{y_b>k}, l_bk) / sum_{b,k} m_bk,   m_bk = 1{y_b >= k}.
    Returned per example as sum_k m_bk BCE_bk / mean_b(sum_k m_bk), so that the default
    batch mean of a ``keras.losses.Loss`` equals the reference value.

    Args: y_true int grades ``[B]`` in 0..K-1; y_pred CORN logits ``[B, K-1]``.
    Returns: float32 ``[B]``.
    """
    y = ops.expand_dims(ops.cast(_sparse_labels(y_true), y_pred.dtype), -1)
    ranks = ops.arange(y_pred.shape[-1], dtype=y_pred.dtype)
    mask = ops.cast(y >= ranks, y_pred.dtype)
    per_example = ops.sum(mask * _bce_with_logits(_levels(y_true, y_pred), y_pred), axis=-1)
    # >= 1 because task 0 uses every example.
    return per_example / ops.mean(ops.sum(mask, axis=-1))


def weighted_crossentropy(y_true, y_pred, class_weights=None, label_smoothing=0.0):
    """Softmax cross-entropy from sparse labels, with class weights and label smoothing.

    q = (1 - eps) onehot(y) + eps / K (Szegedy et al. 2016, label smoothing);
    L = -w_y sum_k q_k log softmax(logits)_k, w = ``class_weights`` ``[K]`` indexed by the
    TRUE class (Keras' ``class_weight`` convention; not renormalised over the batch).

    Args: y_true int ``[B]``; y_pred logits ``[B, K]``. Returns: float32 ``[B]``.
    """
    num_classes = y_pred.shape[-1]
    onehot = ops.one_hot(_sparse_labels(y_true), num_classes, dtype=y_pred.dtype)
    q = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
    loss = -ops.sum(q * ops.log_softmax(y_pred, axis=-1), axis=-1)
    if class_weights is not None:
        loss = loss * ops.sum(onehot * _vector(class_weights), axis=-1)
    return loss


def _levels(y_true, y_pred):
    """Cumulative targets 1{y > k}, float32 ``[B, K-1]``."""
    y = ops.expand_dims(ops.cast(_sparse_labels(y_true), y_pred.dtype), -1)
    return ops.cast(y > ops.arange(y_pred.shape[-1], dtype=y_pred.dtype), y_pred.dtype)


# ----------------------------------------------------------------------------- Loss classes


class _FunctionLoss(keras.losses.Loss):
    """Calls ``self.fn(y_true, y_pred, **hyperparameters)``; config = base config + those."""

    fn = None

    def __init__(self, name, reduction, dtype, **hyperparameters):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.hyperparameters = hyperparameters

    def call(self, y_true, y_pred):
        return type(self).fn(y_true, y_pred, **self.hyperparameters)

    def get_config(self):
        return {**super().get_config(), **self.hyperparameters}


@gin.configurable
@keras.saving.register_keras_serializable(package="fundusflow")
class BinaryFocalLoss(_FunctionLoss):
    """``binary_focal_loss`` as a Loss (sigmoid heads: binary, multilabel)."""

    fn = staticmethod(binary_focal_loss)

    def __init__(
        self,
        gamma=2.0,
        alpha=0.25,
        reduction_over_labels="mean",
        reduction="sum_over_batch_size",
        name="binary_focal_loss",
        dtype=None,
    ):
        super().__init__(
            name,
            reduction,
            dtype,
            gamma=gamma,
            alpha=alpha,
            reduction_over_labels=reduction_over_labels,
        )


@gin.configurable
@keras.saving.register_keras_serializable(package="fundusflow")
class CategoricalFocalLoss(_FunctionLoss):
    """``categorical_focal_loss`` as a Loss (softmax heads, sparse labels)."""

    fn = staticmethod(categorical_focal_loss)

    def __init__(
        self,
        gamma=2.0,
        alpha=None,
        reduction="sum_over_batch_size",
        name="categorical_focal_loss",
        dtype=None,
    ):
        super().__init__(name, reduction, dtype, gamma=gamma, alpha=_as_list(alpha))


@gin.configurable
@keras.saving.register_keras_serializable(package="fundusflow")
class AsymmetricLoss(_FunctionLoss):
    """``asymmetric_loss`` (ASL) as a Loss (multilabel; also binary)."""

    fn = staticmethod(asymmetric_loss)

    def __init__(
        self,
        gamma_neg=4.0,
        gamma_pos=1.0,
        clip=0.05,
        reduction_over_labels="sum",
        reduction="sum_over_batch_size",
        name="asymmetric_loss",
        dtype=None,
    ):
        super().__init__(
            name,
            reduction,
            dtype,
            gamma_neg=gamma_neg,
            gamma_pos=gamma_pos,
            clip=clip,
            reduction_over_labels=reduction_over_labels,
        )


@gin.configurable
@keras.saving.register_keras_serializable(package="fundusflow")
class WeightedBinaryCrossentropy(_FunctionLoss):
    """``weighted_binary_crossentropy`` as a Loss; ``pos_weight=None`` is the plain BCE."""

    fn = staticmethod(weighted_binary_crossentropy)

    def __init__(
        self,
        pos_weight=None,
        reduction_over_labels="mean",
        reduction="sum_over_batch_size",
        name="weighted_bce",
        dtype=None,
    ):
        super().__init__(
            name,
            reduction,
            dtype,
            pos_weight=_as_list(pos_weight),
            reduction_over_labels=reduction_over_labels,
        )


@gin.configurable
@keras.saving.register_keras_serializable(package="fundusflow")
class CoralLoss(_FunctionLoss):
    """``coral_loss`` as a Loss (``head="coral"``)."""

    fn = staticmethod(coral_loss)

    def __init__(
        self,
        importance_weights=None,
        reduction="sum_over_batch_size",
        name="coral_loss",
        dtype=None,
    ):
        super().__init__(name, reduction, dtype, importance_weights=_as_list(importance_weights))


@gin.configurable
@keras.saving.register_keras_serializable(package="fundusflow")
class CornLoss(_FunctionLoss):
    """``corn_loss`` as a Loss (``head="corn"``)."""

    fn = staticmethod(corn_loss)

    def __init__(self, reduction="sum_over_batch_size", name="corn_loss", dtype=None):
        super().__init__(name, reduction, dtype)


@gin.configurable
@keras.saving.register_keras_serializable(package="fundusflow")
class WeightedCrossentropy(_FunctionLoss):
    """``weighted_crossentropy`` as a Loss (softmax heads, sparse labels)."""

    fn = staticmethod(weighted_crossentropy)

    def __init__(
        self,
        class_weights=None,
        label_smoothing=0.0,
        reduction="sum_over_batch_size",
        name="weighted_crossentropy",
        dtype=None,
    ):
        super().__init__(
            name,
            reduction,
            dtype,
            class_weights=_as_list(class_weights),
            label_smoothing=label_smoothing,
        )


# ----------------------------------------------------------------------------- factory

# Head kind -> loss name -> class. The head decides which losses make sense for its logits.
LOSSES_BY_HEAD: dict[str, dict[str, type[keras.losses.Loss]]] = {
    "sigmoid": {
        "bce": WeightedBinaryCrossentropy,
        "weighted_bce": WeightedBinaryCrossentropy,
        "focal": BinaryFocalLoss,
        "asl": AsymmetricLoss,
    },
    "softmax": {"ce": WeightedCrossentropy, "focal": CategoricalFocalLoss},
    "coral": {"coral": CoralLoss},
    "corn": {"corn": CornLoss},
}


def default_loss(task: str, head: str | None = None) -> str:
    """``bce`` (sigmoid), ``ce`` (softmax), ``coral`` or ``corn``: the head's first loss."""
    return next(iter(LOSSES_BY_HEAD[heads.check_head(task, head)]))


def get_loss(name: str | None, task: str, head: str | None = None, **kw) -> keras.losses.Loss:
    """The loss ``name`` for ``task``/``head`` (None: the task's default head / loss).

    ``kw`` goes to the Loss class, e.g. ``get_loss("focal", "multilabel", gamma=2.5,
    alpha=0.15, reduction_over_labels="sum")``. Raises ValueError for a name that does not
    fit the head, listing those that do, and for an argument the loss does not take (e.g.
    ``pos_weight`` for focal), listing those it does.
    """
    head = heads.check_head(task, head)
    name = name or default_loss(task, head)
    choices = LOSSES_BY_HEAD[head]
    if name not in choices:
        raise ValueError(
            f"Loss {name!r} does not fit task {task!r} with head {head!r}; "
            f"use one of {sorted(choices)}"
        )
    accepted = set(inspect.signature(choices[name].__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(kw) - accepted)
    if unknown:
        raise ValueError(f"Loss {name!r} takes no argument(s) {unknown}; it takes "
                         f"{sorted(accepted)}")
    return choices[name](**kw)

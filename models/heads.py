"""Output heads (the "logits" layer) and decoding of their logits.

Every head outputs raw logits, float32 ``[B, D]``; activations live here, in
``probabilities``, and in the losses (which all take logits). Decisions (grade, class,
labels) are ``models.decision``'s, on these probabilities.

| task         | head              | D    | meaning of logit column k                          |
|--------------|-------------------|------|----------------------------------------------------|
| `binary`     | `sigmoid` (dflt)  | 1    | logit of P(y = 1)                                  |
| `binary`     | `softmax`         | 2    | class logits (the IDRiD system's two-way softmax)  |
| `multiclass` | `softmax` (dflt)  | K    | class logits                                       |
| `dr_grade`   | `coral` (dflt)    | K-1  | logit of P(y > k); shared weights, K-1 biases      |
| `dr_grade`   | `corn`            | K-1  | logit of P(y > k | y > k-1)                        |
| `dr_grade`   | `softmax`         | K    | class logits                                       |
| `multilabel` | `sigmoid` (dflt)  | C    | logit of P(label c present)                        |

The helpers use ``keras.ops`` only, so they run on keras tensors of any
backend; numpy in gives numpy out (handy in evaluation).
"""

import keras
import numpy as np
from keras import ops

TASKS = ("binary", "multiclass", "dr_grade", "multilabel")
HEADS = {
    "binary": ("sigmoid", "softmax"),
    "multiclass": ("softmax",),
    "dr_grade": ("coral", "corn", "softmax"),
    "multilabel": ("sigmoid",),
}
ORDINAL_HEADS = ("coral", "corn")


def default_head(task: str) -> str:
    """The head used when ``build_model(head=None)``: the first of ``HEADS[task]``."""
    return check_head(task, None)


def check_head(task: str, head: str | None) -> str:
    """Returns ``head`` (or the task's default) or raises ValueError if it does not fit."""
    if task not in HEADS:
        raise ValueError(f"Unknown task {task!r}; known tasks: {list(TASKS)}")
    if head is None:
        return HEADS[task][0]
    if head not in HEADS[task]:
        raise ValueError(f"Head {head!r} does not fit task {task!r}; use one of {HEADS[task]}")
    return head


def output_dim(task: str, num_classes: int, head: str | None = None) -> int:
    """Width D of the logits for ``task`` with ``num_classes`` classes (or labels)."""
    head = check_head(task, head)
    if task == "binary":
        if num_classes not in (1, 2):
            raise ValueError(f"binary task needs num_classes 2, got {num_classes}")
        return 1 if head == "sigmoid" else 2
    if num_classes < 2:
        raise ValueError(f"{task} task needs num_classes >= 2, got {num_classes}")
    return num_classes - 1 if head in ORDINAL_HEADS else num_classes


def _coral_bias_init(shape, dtype=None):
    """(K-1, ..., 1) / (K-1): decreasing, so P(y > k) starts ordered (as coral_pytorch)."""
    k = shape[0]
    return ops.cast(ops.arange(k, 0, -1), dtype or "float32") / float(k)


@keras.saving.register_keras_serializable(package="fundusflow")
class CoralDense(keras.layers.Layer):
    """CORAL output layer (Cao et al. 2020, "Rank consistent ordinal regression", arXiv:1901.07884).

    logit_k = w . x + b_k for k = 0..K-2: one weight vector shared by all K-1
    binary tasks (``self.fc``, a bias-free Dense(1)) plus K-1 independent biases.
    Input ``[B, F]`` -> output ``[B, K-1]``. The biases start decreasing, so the
    cumulative probabilities P(y > k) start ordered; with a shared w they stay
    rank-consistent as long as the biases stay ordered.
    """

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"CoralDense needs num_classes >= 2, got {num_classes}")
        self.num_classes = num_classes
        # The sublayer follows this layer's dtype policy (float32 logits under mixed precision).
        self.fc = keras.layers.Dense(1, use_bias=False, dtype=self.dtype_policy, name="fc")

    def build(self, input_shape):
        self.fc.build(input_shape)
        self.bias = self.add_weight(
            shape=(self.num_classes - 1,), initializer=_coral_bias_init, name="bias"
        )

    def call(self, inputs):
        return self.fc(inputs) + self.bias

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_classes - 1)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def build_head(task: str, num_classes: int, head: str | None = None, name: str = "logits"):
    """The float32 logits layer for ``task``/``head`` (input ``[B, F]``, output ``[B, D]``)."""
    head = check_head(task, head)
    dim = output_dim(task, num_classes, head)
    if head == "coral":
        return CoralDense(num_classes, dtype="float32", name=name)
    return keras.layers.Dense(dim, dtype="float32", name=name)


# ----------------------------------------------------------------------------- probabilities


def _cumulative_probs(logits, head: str):
    """P(y > k) for k = 0..K-2, ``[B, K-1]``, non-increasing in k for CORN (product)."""
    probs = ops.sigmoid(logits)
    if head == "corn":
        # CORN logits are conditional: P(y > k) = prod_{j <= k} P(y > j | y > j-1).
        probs = ops.cumprod(probs, axis=-1)
    return probs


def _to_numpy_if(x, like):
    return ops.convert_to_numpy(x) if isinstance(like, np.ndarray) else x


def probabilities(logits, head: str):
    """Logits ``[B, D]`` -> probabilities, float32.

    - ``softmax``: softmax ``[B, K]``.
    - ``sigmoid`` with D == 1 (binary): ``[B, 2]`` = (1 - p, p).
    - ``sigmoid`` with D > 1 (multilabel): per-label sigmoid ``[B, C]`` (rows need not sum to 1).
    - ``coral`` / ``corn`` ``[B, K-1]``: class probabilities ``[B, K]`` from differences of the
      cumulative probabilities c_k = P(y > k): P(y=0) = 1 - c_0, P(y=k) = c_{k-1} - c_k,
      P(y=K-1) = c_{K-2}; clipped at 0 (CORAL's c_k can cross) and renormalised to sum 1.
    """
    x = ops.cast(ops.convert_to_tensor(logits), "float32")
    if head == "softmax":
        out = ops.softmax(x, axis=-1)
    elif head == "sigmoid":
        p = ops.sigmoid(x)
        out = ops.concatenate([1.0 - p, p], axis=-1) if x.shape[-1] == 1 else p
    elif head in ORDINAL_HEADS:
        cum = _cumulative_probs(x, head)
        ones = ops.ones_like(cum[..., :1])
        upper = ops.concatenate([ones, cum], axis=-1)  # P(y > k-1), with P(y > -1) = 1
        lower = ops.concatenate([cum, ones * 0.0], axis=-1)  # P(y > k), with P(y > K-1) = 0
        diff = ops.maximum(upper - lower, 0.0)
        out = diff / ops.maximum(ops.sum(diff, axis=-1, keepdims=True), 1e-12)
    else:
        raise ValueError(f"Unknown head {head!r}")
    return _to_numpy_if(out, logits)

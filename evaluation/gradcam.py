"""Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391) on the backbone's last conv feature map.

Works for every registered backbone, including keras.applications trunks nested in the
task model as the layer "backbone". Taking `backbone.output` (or one of its layers) next
to `model.output` in one keras.Model fails in Keras 3 ("Output ... is not connected to
inputs", the old "graph disconnected"). The construction that works (docs/PITFALLS s.4):
a new Input -> the backbone (its output IS the last conv map, include_top=False) -> the
task model's own "gap" and "logits" layers, so weights are shared; "dropout" is skipped
(identity at inference).

Keras 3 has no backend-neutral gradient, so `_head_gradient` takes d score / d map with
tf.GradientTape on the TensorFlow backend and jax.grad on JAX (the GPU host's backend).
Only the head (gap -> logits) is differentiated: the map itself is a plain forward pass.

What is explained (the "score" whose gradient weights the feature channels):
- target = k (default): logit column k. softmax: class k; sigmoid binary: k = 0 (the
  positive class); multilabel: label k; coral: k = g - 1 is the cumulative logit of
  "grade >= g"; corn: k = g - 1 is the conditional logit of "grade >= g | grade >= g - 1".
- score_fn = expected_grade_score(head): E[grade] = sum_k k P(k), for any dr_grade head.
"""

import io
import pathlib

import keras
import matplotlib
import numpy as np
from keras import ops
from PIL import Image

from models import heads

_HEAD_LAYERS = ("backbone", "gap", "dropout", "logits")


def _head_gradient(score, conv) -> np.ndarray:
    """d sum(score(conv)) / d conv as float32 numpy, conv [B, h, w, C] (TF or JAX backend).

    Images are independent at inference, so d sum / d A_i = d score_i / d A_i.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        conv = tf.convert_to_tensor(conv)
        with tf.GradientTape() as tape:
            tape.watch(conv)
            total = tf.reduce_sum(score(conv))
        return tape.gradient(total, conv).numpy().astype(np.float32)
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda c: ops.sum(score(c)))(conv), np.float32)
    raise RuntimeError(f"Grad-CAM supports the tensorflow and jax backends, not {backend!r}")


def _check_layout(model: keras.Model) -> None:
    names = [layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if names != list(_HEAD_LAYERS):
        raise ValueError(f"Grad-CAM expects layers {_HEAD_LAYERS} after the input, got {names}")


def cam_model(model: keras.Model) -> keras.Model:
    """image [B, S, S, 3] in [0, 255] -> [conv map [B, h, w, C], logits [B, D]], sharing weights.

    Raises ValueError if `model` is not image -> backbone -> gap -> dropout -> logits
    (other layers would be silently skipped).
    """
    _check_layout(model)
    image = keras.Input(model.input_shape[1:], dtype="float32", name="image")
    conv = model.get_layer("backbone")(image)
    logits = model.get_layer("logits")(model.get_layer("gap")(conv))
    return keras.Model(image, [conv, logits], name="gradcam")


def expected_grade_score(head: str):
    """score_fn for ordinal heads: logits [B, D] -> E[grade] [B] (keras.ops, differentiable)."""
    def score(logits):
        probs = heads.probabilities(logits, head)
        return ops.sum(probs * ops.arange(probs.shape[-1], dtype="float32"), axis=-1)
    return score


def default_target(task: str, head: str, probs: np.ndarray, decisions: np.ndarray) -> dict:
    """`gradcam` keyword arguments that explain each image's decision.

    dr_grade: E[grade] for any head; binary sigmoid: the one (positive) logit; multilabel:
    each image's most probable label; otherwise the decided class's logit.

    Args:
        probs: float [B, K] or [B, C]; decisions: int [B] or 0/1 [B, C].
    """
    if task == "dr_grade":
        return {"score_fn": expected_grade_score(head)}
    if task == "binary" and head == "sigmoid":
        return {"target": 0}
    if task == "multilabel":
        return {"target": np.argmax(probs, axis=1).astype(np.int32)}
    return {"target": np.asarray(decisions, np.int32)}


def gradcam(model: keras.Model, images, target=0, score_fn=None,
            batch_size: int = 16) -> np.ndarray:
    """Class-activation maps upsampled to the input size.

    Args:
        model: task model from models.build_model.
        images: float [B, S, S, 3] pixels in [0, 255] (what the model takes).
        target: logit column, int or int [B] (one per image); ignored with score_fn.
        score_fn: optional logits [B, D] -> score [B] to explain instead (e.g.
            `expected_grade_score(head)`).
        batch_size: images per gradient pass.

    Returns:
        float32 [B, S, S] in [0, 1]: ReLU(sum_c w_c A_c), w_c = spatial mean of
        d score / d A_c, bilinearly resized to S x S, divided by its per-image max
        (all zeros where the map is zero everywhere).
    """
    images = np.asarray(images, np.float32)
    targets = np.broadcast_to(np.asarray(target, np.int32), (len(images),))
    _check_layout(model)
    backbone, gap, logits_layer = (model.get_layer(n) for n in ("backbone", "gap", "logits"))
    out = []
    for start in range(0, len(images), batch_size):
        t = targets[start:start + batch_size]

        def score(conv, t=t):
            logits = logits_layer(gap(conv))
            if score_fn is not None:
                return score_fn(logits)
            return ops.take_along_axis(logits, ops.convert_to_tensor(t[:, None]), axis=1)[:, 0]

        conv = backbone(images[start:start + batch_size], training=False)
        grads = _head_gradient(score, conv)
        conv = ops.convert_to_numpy(conv).astype(np.float32)
        weights = grads.mean(axis=(1, 2), keepdims=True)
        cam = np.maximum((weights * conv).sum(axis=-1), 0.0)[..., None]
        cam = ops.convert_to_numpy(ops.image.resize(cam, images.shape[1:3],
                                                    interpolation="bilinear"))[..., 0]
        peak = cam.max(axis=(1, 2), keepdims=True)
        out.append(np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0))
    return np.concatenate(out).astype(np.float32)


def overlay(image, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Jet-coloured CAM blended over the image.

    Args:
        image: [S, S, 3] RGB, uint8 or float in [0, 255].
        cam: float [S, S] in [0, 1].
        alpha: weight of the heat map.

    Returns:
        uint8 RGB [S, S, 3].
    """
    heat = matplotlib.colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255.0
    blend = (1 - alpha) * np.asarray(image, np.float32) + alpha * heat
    return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of a uint8 RGB [H, W, 3] image."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path, rgb: np.ndarray) -> pathlib.Path:
    """Writes a uint8 RGB [H, W, 3] image as PNG; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(rgb))
    return path

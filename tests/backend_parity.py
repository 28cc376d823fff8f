"""Outputs of models/ and Grad-CAM under whichever Keras backend runs this module.

`python -m tests.backend_parity DIR` (KERAS_BACKEND=jax) loads the weights the
TensorFlow side saved in DIR, computes the same outputs and writes DIR/jax.npz;
`test_backends.py` compares them with the TensorFlow values. Also saves weights
of a model initialised on JAX, for the opposite direction.
"""

import pathlib
import sys

import keras
import numpy as np
from keras import ops

from evaluation import gradcam
from models import build_model, heads, losses
from models import metrics as mm

SIZE = 32
# (model, task, head, build_model keyword arguments): every head kind, four backbones.
MODELS = {
    "resnetv2_lite-coral": ("resnetv2_lite", "dr_grade", "coral", {}),
    # Tap depthwise here; mobilenetv3_large keeps the native DepthwiseConv2D.
    "efficientnet_b3-corn": ("efficientnet_b3", "dr_grade", "corn", {"depthwise": "taps"}),
    "convnext_tiny-multilabel": ("convnext_tiny", "multilabel", None, {}),
    "mobilenetv3_large-binary": ("mobilenetv3_large", "binary", None, {}),
    # resnet50v2 (plain conv/BN/ReLU, as resnetv2_lite) is left out: JAX builds cost ~6 s each.
}
NUM_CLASSES = {"dr_grade": 5, "multiclass": 4, "binary": 2, "multilabel": 3}


def _pixels(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def _build(key: str) -> keras.Model:
    name, task, head, kw = MODELS[key]
    keras.utils.set_random_seed(0)
    return build_model(name, task, NUM_CLASSES[task], SIZE, head=head, **kw)


def model_outputs(directory: pathlib.Path, save: bool) -> dict[str, np.ndarray]:
    """Logits [2, D] of every MODELS entry, weights saved to (or loaded from) directory."""
    out = {}
    for key in MODELS:
        model = _build(key)
        path = directory / f"{key}.weights.h5"
        model.save_weights(path) if save else model.load_weights(path)
        out[f"logits/{key}"] = model.predict(_pixels(), verbose=0)  # jit-compiled forward
        if key == "resnetv2_lite-coral":
            out["gradcam"] = gradcam.gradcam(
                model, _pixels(3, seed=1), score_fn=gradcam.expected_grade_score("coral"))
    return out


def loss_and_metric_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    logits3 = rng.normal(size=(16, 3)).astype("float32") * 2
    logits4 = rng.normal(size=(16, 4)).astype("float32") * 2
    multi = (rng.uniform(size=(16, 3)) < 0.4).astype("float32")
    sparse = rng.integers(0, 3, 16).astype("int32")
    grade = rng.integers(0, 5, 16).astype("int32")
    cases = {
        "bce": (losses.WeightedBinaryCrossentropy(pos_weight=[1.0, 3.0, 8.0]), multi, logits3),
        "focal": (losses.BinaryFocalLoss(gamma=2.5, alpha=0.15), multi, logits3),
        "asl": (losses.AsymmetricLoss(), multi, logits3),
        "ce": (losses.WeightedCrossentropy(class_weights=[1.0, 2.0, 3.0], label_smoothing=0.1),
               sparse, logits3),
        "cfocal": (losses.CategoricalFocalLoss(), sparse, logits3),
        "coral": (losses.CoralLoss(), grade, logits4),
        "corn": (losses.CornLoss(), grade, logits4),
    }
    out = {f"loss/{k}": ops.convert_to_numpy(loss(y, z)) for k, (loss, y, z) in cases.items()}
    for name, metric in [("qwk", mm.QWK(5, "coral")), ("macro_f1", mm.MacroF1(5, "coral"))]:
        metric.update_state(grade, logits4)
        out[f"metric/{name}"] = ops.convert_to_numpy(metric.result())
    out["probabilities/corn"] = ops.convert_to_numpy(heads.probabilities(logits4, "corn"))
    return out


def main(directory: str) -> None:
    directory = pathlib.Path(directory)
    values = {**model_outputs(directory, save=False), **loss_and_metric_values()}
    np.savez(directory / f"{keras.backend.backend()}.npz", **values)
    model = _build("mobilenetv3_large-binary")  # initialised on this backend
    model.save_weights(directory / "from_jax.weights.h5")
    np.save(directory / "from_jax_logits.npy", ops.convert_to_numpy(model(_pixels())))


if __name__ == "__main__":
    main(sys.argv[1])

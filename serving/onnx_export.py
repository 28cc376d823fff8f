"""ONNX export: the tensor-in model (no image decoding) converted with tf2onnx.

`E/N/model.onnx` takes `image` float32 [B, S, S, 3] in [0, 255] (NHWC, RGB) and
returns `logits`, `probabilities` and the decision (as the SavedModel's
`serve_tensor`); `E/N/preprocessing.json` tells the client what to do before
(decode, fundus crop, resize, ...). The Keras graph is first rewritten into
layers tf2onnx converts (`onnx_friendly`), and the result is checked against
Keras before it is published.
"""

import json
import pathlib
import subprocess
import sys
import tempfile

import keras
import numpy as np
from keras import ops

from models import decision
from serving import exporting

ONNX_OPSET = 17
PREPROCESSING_JSON = "preprocessing.json"


@keras.saving.register_keras_serializable(package="fundusflow")
class ErfGelu(keras.layers.Layer):
    """Exact GELU written as 0.5 x (1 + erf(x / sqrt 2)): tf2onnx has Erf but not Erfc."""

    def call(self, x):
        return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))


def _is_depthwise_grouped(layer) -> bool:
    return (type(layer) is keras.layers.Conv2D and layer.groups > 1
            and layer.groups == layer.filters == layer.input.shape[-1])


def _is_gelu(layer) -> bool:
    return (type(layer) is keras.layers.Activation
            and layer.activation is keras.activations.gelu)


def _onnx_layer(layer):
    """clone_function: grouped convs that are depthwise -> DepthwiseConv2D; GELU -> erf form."""
    if _is_depthwise_grouped(layer):
        return keras.layers.DepthwiseConv2D(
            layer.kernel_size, strides=layer.strides, padding=layer.padding,
            dilation_rate=layer.dilation_rate, use_bias=layer.use_bias,
            activation=layer.activation, dtype=layer.dtype_policy, name=layer.name)
    if _is_gelu(layer):
        return ErfGelu(dtype=layer.dtype_policy, name=layer.name)
    return layer.__class__.from_config(layer.get_config())


def _copy_weights(source: keras.Model, clone: keras.Model) -> None:
    """Weights by layer path; grouped-conv kernels [kh, kw, 1, C] -> depthwise [kh, kw, C, 1]."""
    for old, new in zip(exporting.all_layers(source), exporting.all_layers(clone), strict=True):
        if isinstance(old, keras.Model) or not old.weights:
            continue
        weights = old.get_weights()
        if _is_depthwise_grouped(old):
            weights[0] = np.transpose(weights[0], (0, 1, 3, 2))
        new.set_weights(weights)


def onnx_friendly(model: keras.Model) -> keras.Model:
    """The model, or a clone that tf2onnx converts.

    Keras runs a grouped Conv2D inside a nested jit-compiled function, which
    tf2onnx leaves as an unconvertible StatefulPartitionedCall, and exact GELU
    lowers to Erfc, which tf2onnx lacks (ConvNeXt has both). The clone swaps
    them for DepthwiseConv2D and the erf form, with the same weights.
    """
    if not any(_is_depthwise_grouped(layer) or _is_gelu(layer)
               for layer in exporting.all_layers(model)):
        return model
    clone = keras.models.clone_model(model, clone_function=_onnx_layer, recursive=True)
    _copy_weights(model, clone)
    return clone


def onnx_fn(model: keras.Model, spec: exporting.ServingSpec):
    """Tensor-in function for ONNX: logits too, so clients can re-calibrate."""
    def serve(image):
        logits = exporting.served_logits(model, image, spec)
        return {"logits": logits, **exporting.postprocess(logits, spec)}
    return serve


def preprocessing_json(spec: exporting.ServingSpec) -> dict:
    """What a tensor-in client must do before the model (the graph cannot decode images)."""
    s = spec.preprocess.model_image_size
    return {
        "input": {"name": "image", "dtype": "float32", "shape": [None, s, s, 3],
                  "layout": "NHWC", "channels": "RGB", "value_range": [0, 255]},
        "steps": [
            "decode to uint8 RGB (JPEG: at the largest 1/2, 1/4, 1/8 DCT scale whose shorter "
            "side stays >= image_size, when reduced_decode); EXIF orientation applied, "
            "16-bit -> 8-bit, alpha composited on black, grayscale -> RGB",
            "crop='fundus': find the field-of-view circle, crop its bounding square "
            "(side round(2r), zero-padded where the frame clips it); crop='none': whole frame",
            "resize to image_size x image_size (area average when shrinking, "
            "bicubic when enlarging), round to uint8",
            "clahe='green': cv2.createCLAHE(clahe_clip_limit, (clahe_tile_grid,) * 2) on the "
            "green channel",
            "ben_graham: 4 * (img - GaussianBlur(img, sigma * image_size / 512)) + 128,"
            " black outside 95% of the inscribed circle (fundus crop only)",
            "JPEG round trip at jpeg_quality (TF's encoder; decode with the accurate IDCT), "
            "as prepare stores the training images",
            "input_pipeline.pipeline.preprocess_image: resize to the model size, float32 "
            "in [0, 255]; normalisation is inside the model",
        ],
        "reference_implementation": "input_pipeline.preprocessing.process, then "
                                    "input_pipeline.preprocessing.model_pixels",
        "config": spec.preprocess.to_json(),
        **{k: v for k, v in spec.to_json().items() if k != "preprocessing"},
    }


def _convert_onnx(saved_model: pathlib.Path, output: pathlib.Path) -> None:
    """tf2onnx's CLI on a SavedModel (the route that also works for EfficientNet)."""
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model),
           "--signature_def", "serve", "--opset", str(ONNX_OPSET), "--output", str(output)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not output.is_file():
        raise RuntimeError(f"tf2onnx failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def check_onnx(model: keras.Model, path: pathlib.Path, batch: int = 2,
               rtol: float = 1e-4, tta: bool = False) -> float:
    """Runs the ONNX model and the Keras model (flip-averaged when `tta`) on the same pixels.

    Returns the relative difference of the logits, max|a - b| / max|b|; raises
    RuntimeError above `rtol`.
    """
    import onnxruntime  # the [onnx] extra; only needed here

    s = exporting.image_size(model)
    x = np.random.default_rng(0).uniform(0, 255, (batch, s, s, 3)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x}), strict=True))
    want = ops.convert_to_numpy(decision.served_logits(model, x, tta))
    rel = float(np.max(np.abs(got["logits"] - want)) / max(np.max(np.abs(want)), 1e-12))
    if not rel < rtol:
        raise RuntimeError(f"ONNX logits differ from Keras: relative difference {rel:.2e}")
    return rel


def write_onnx(model: keras.Model, spec: exporting.ServingSpec, export_dir,
               version: int | None = None, model_card: str | None = None) -> pathlib.Path:
    """Writes `export_dir/version/{model.onnx, preprocessing.json[, model_card.md]}`.

    The ONNX model is the tensor-in model (float32 [B, S, S, 3] in [0, 255]) with
    outputs logits, probabilities and the decision; decoding and fundus
    cropping are the client's (preprocessing.json). Checked against Keras.
    """
    out = exporting.version_dir(export_dir, version)
    tmp = exporting.staging_dir(out)
    tmp.mkdir()
    convertible = onnx_friendly(model)
    archive = keras.export.ExportArchive()
    archive.track(convertible)
    archive.add_endpoint("serve", onnx_fn(convertible, spec),
                         input_signature=[exporting.tensor_spec(spec.preprocess.model_image_size)])
    with tempfile.TemporaryDirectory() as saved_model:
        archive.write_out(saved_model, verbose=False)
        _convert_onnx(pathlib.Path(saved_model), tmp / "model.onnx")
    check_onnx(model, tmp / "model.onnx", tta=spec.tta)
    (tmp / PREPROCESSING_JSON).write_text(json.dumps(preprocessing_json(spec), indent=2) + "\n")
    if model_card is not None:
        (tmp / "model_card.md").write_text(model_card)
    return exporting.publish(tmp, out)

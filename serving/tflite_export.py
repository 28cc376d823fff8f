"""TFLite export for edge devices: the tensor-in model as float32, float16 or int8.

`E/N/model.tflite` has one signature, the SavedModel's `serve_tensor`:
input `image` float32 [B, S, S, 3] in [0, 255] (NHWC, RGB), outputs
`probabilities` and the decision (`grade` / `class_id` / `labels`), with the
same temperature and tuned rule. TFLite cannot run the image-bytes part of the
SavedModel (JPEG/PNG decoding, the fundus-circle search and its crop), so the
caller pre-processes each photograph first, with the same pipeline:
`E/N/preprocessing.json` lists the steps and their settings, and
`input_pipeline.preprocessing.process` then `model_pixels` (TF) is the reference
implementation.

Quantization (`--tflite_quantization`):
- float32: the same arithmetic as the SavedModel (differences ~1e-6).
- float16: weights stored as float16 (half the file), computed in float32.
- int8: weights and activations int8 (about a quarter of the file), calibrated
  on a representative set of training images (`representative_images`); input
  and outputs stay float32, concatenations (INT8_FLOAT_OPS) stay float, and the
  probabilities come in steps of about 1/256.
Measured agreement with the SavedModel: benchmarks/tflite_agreement.py.
"""

import json
import os
import pathlib
import tempfile

import keras
import numpy as np
import tensorflow as tf

from serving import exporting, onnx_export

QUANTIZATIONS = ("float32", "float16", "int8")
SIGNATURE = "serve_tensor"  # the SavedModel's tensor-in signature, converted
MODEL_FILE = "model.tflite"
REPRESENTATIVE_IMAGES = 200
# The CORAL probabilities concatenate P(y > 0) with differences of sigmoids; the int8
# quantizer cannot give both inputs one scale ("same scale constraint"), so it stays float.
INT8_FLOAT_OPS = ("CONCATENATION",)
# Largest |probability difference| from the Keras model tolerated on the check
# images; int8 is measured (benchmarks/tflite_agreement.py), not bounded here.
CHECK_ATOL = {"float32": 1e-4, "float16": 2e-2}


def representative_images(data_dir: str | os.PathLike, spec: exporting.ServingSpec,
                          num: int = REPRESENTATIVE_IMAGES) -> np.ndarray:
    """float32 [N, S, S, 3] in [0, 255]: the first `num` training images (file order).

    Raises FileNotFoundError when `data_dir` has no train shards.
    """
    from input_pipeline import pipeline

    pattern = os.path.join(str(data_dir), "train-*.tfrecord")
    ds = pipeline.make_dataset(pattern, batch_size=num, training=False,
                               image_size=spec.preprocess.model_image_size, task=spec.task,
                               num_classes=len(spec.class_names))
    return next(iter(ds))[0].numpy()


def write_tensor_saved_model(model: keras.Model, spec: exporting.ServingSpec,
                             path: str | os.PathLike) -> None:
    """A SavedModel holding only `serve_tensor` (the exported one has it too), to convert."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, exporting.tensor_fn(model, spec),
                         input_signature=[exporting.tensor_spec(spec.preprocess.model_image_size)])
    archive.write_out(str(path), verbose=False)


def convert(saved_model: str | os.PathLike, quantization: str = "float32",
            representative: np.ndarray | None = None) -> bytes:
    """The flatbuffer of a SavedModel's `serve_tensor` signature under `quantization`.

    Args:
        saved_model: an exported version directory, or `write_tensor_saved_model`'s.
        representative: float32 [N, S, S, 3] in [0, 255]; required for int8.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization {quantization!r}; expected one of "
                         f"{QUANTIZATIONS}")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model),
                                                         signature_keys=[SIGNATURE])
    if quantization == "float32":
        return converter.convert()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
        return converter.convert()
    return _int8(converter, representative)


def _int8(converter, representative) -> bytes:
    """Full int8 calibration, except the ops in INT8_FLOAT_OPS, which stay float."""
    if representative is None or not len(representative):
        raise ValueError("int8 quantization needs representative images (training shards)")

    def images():  # one image per step: the converter calibrates on each yielded input list
        return ([image[None]] for image in representative)

    converter.representative_dataset = images
    # The debugger's selective quantization is TFLite's public route to keep ops float;
    # it also runs its statistics on the debug set, hence only two images there.
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: ([image[None]] for image in representative[:2]),
        debug_options=tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=list(INT8_FLOAT_OPS)))
    return debugger.get_nondebug_quantized_model()


class TFLiteModel:
    """A `.tflite` file (or its bytes) run with `tf.lite.Interpreter` on CPU."""

    def __init__(self, model: str | os.PathLike | bytes, num_threads: int | None = None):
        kwargs = ({"model_content": model} if isinstance(model, bytes)
                  else {"model_path": str(model)})
        self.interpreter = tf.lite.Interpreter(**kwargs, num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner(SIGNATURE)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images float32 [B, S, S, 3] in [0, 255] -> the signature's outputs (numpy)."""
        return self.runner(image=np.asarray(images, np.float32))


def check_tflite(model: keras.Model, spec: exporting.ServingSpec, content: bytes,
                 quantization: str, images: np.ndarray | None = None) -> float:
    """Largest |probability difference| between TFLite and Keras on `images`.

    `images` default to 4 random pixel arrays; raises RuntimeError above
    CHECK_ATOL[quantization] (int8 is not bounded).
    """
    if images is None:
        s = spec.preprocess.model_image_size
        images = np.random.default_rng(0).uniform(0, 255, (4, s, s, 3)).astype(np.float32)
    got = TFLiteModel(content)(images)["probabilities"]
    want = keras.ops.convert_to_numpy(exporting.tensor_fn(model, spec)(images)["probabilities"])
    diff = float(np.max(np.abs(got - want)))
    if diff > CHECK_ATOL.get(quantization, np.inf):
        raise RuntimeError(f"TFLite ({quantization}) probabilities differ from Keras by {diff:.2e}")
    return diff


def write_tflite(model: keras.Model, spec: exporting.ServingSpec, export_dir,
                 version: int | None = None, model_card: str | None = None,
                 quantization: str = "float32",
                 representative: np.ndarray | None = None) -> pathlib.Path:
    """Writes `export_dir/version/{model.tflite, preprocessing.json[, model_card.md]}`.

    The model is converted, loaded back in `tf.lite.Interpreter` and compared with
    Keras (`check_tflite`, on up to 8 representative images when given) before
    the version directory is published.
    """
    out = exporting.version_dir(export_dir, version)  # refuses an existing version first
    with tempfile.TemporaryDirectory() as saved_model:
        write_tensor_saved_model(model, spec, saved_model)
        content = convert(saved_model, quantization, representative)
    probe = None if representative is None else representative[:8]
    diff = check_tflite(model, spec, content, quantization, probe)
    tmp = exporting.staging_dir(out)
    tmp.mkdir()
    (tmp / MODEL_FILE).write_bytes(content)
    pre = {**onnx_export.preprocessing_json(spec), "signature": SIGNATURE,
           "quantization": quantization, "max_abs_probability_diff_vs_keras": diff}
    (tmp / onnx_export.PREPROCESSING_JSON).write_text(json.dumps(pre, indent=2) + "\n")
    if model_card is not None:
        (tmp / "model_card.md").write_text(model_card)
    return exporting.publish(tmp, out)

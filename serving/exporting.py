"""Export a trained model for serving: SavedModel with an image-bytes signature, or ONNX.

The SavedModel written to `E/N/` (TF Serving's versioned layout) has two signatures:

| signature         | input                                    | outputs                           |
| ----------------- | ---------------------------------------- | --------------------------------- |
| `serving_default` | `image_bytes` tf.string [B] (JPEG/PNG)   | probabilities, decision, names,   |
|                   |                                          | ok, error, gradable, quality, ... |
| `serve_tensor`    | `image` float32 [B, S, S, 3] in [0, 255] | probabilities, decision           |

Outputs: `probabilities` float32 [B, K] (class probabilities; per-label [B, C]
for multilabel), the decision as int32 (`grade` [B] for dr_grade, `class_id`
[B] for binary / multiclass, `labels` 0/1 [B, C] for multilabel) and
`class_names` tf.string [B, K] (the names broadcast per example, so every
output shares the batch dimension, which TF Serving's row format needs).
`serving_default` adds per-image status from `input_pipeline.preprocessing`
(the pre-processing prepare ran): `ok` bool [B] and `error` tf.string [B] (a
bad image never fails the batch; its probabilities are those of a black
image and must be ignored), `gradable` bool [B], `quality` tf.string [B]
(reasons joined by ";", "" when gradable) and `field_circle` float32 [B, 3]
(cx, cy, r of the field of view in original pixels).

The decision rule is the one `evaluate` tuned (W/eval/thresholds.json, in the
format of `evaluation.thresholds`; untuned defaults when absent), applied in
the graph to probabilities after temperature scaling.

Backends: the model and the post-processing (`postprocess`) use keras.ops
only and sit in the `serve_tensor` endpoint; the TF-only image decoding wraps
that endpoint. On the JAX backend ExportArchive converts endpoints with
jax2tf, which is why the decode is kept outside (docs/PITFALLS.md section 1);
only the TF backend is tested (future work: run and test on JAX).
"""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from input_pipeline import preprocessing
from models import heads

ONNX_OPSET = 17
PREPROCESSING_JSON = "preprocessing.json"
METADATA_JSON = "fundusflow.json"
DECISION_NAMES = {"dr_grade": "grade", "binary": "class_id", "multiclass": "class_id",
                  "multilabel": "labels"}


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """Everything besides the weights that the served graph needs."""

    task: str
    head: str
    class_names: tuple[str, ...]
    rule: dict  # an evaluation.thresholds decision rule ({"type": ..., ...})
    preprocess: preprocessing.PreprocessConfig  # with model_image_size set
    temperature: float | tuple[float, ...] = 1.0  # logits are divided by it

    @property
    def decision_name(self) -> str:
        return DECISION_NAMES[self.task]

    def to_json(self) -> dict:
        return {"task": self.task, "head": self.head, "class_names": list(self.class_names),
                "decision_output": self.decision_name, "decision_rule": self.rule,
                "temperature": (list(self.temperature) if isinstance(self.temperature, tuple)
                                else self.temperature),
                "preprocessing": self.preprocess.to_json()}


# --------------------------------------------------------------------------- decision rule


def default_rule(task: str, num_classes: int) -> dict:
    """The untuned rule: threshold 0.5, argmax, rounding of the expected grade."""
    if task == "binary":
        return {"type": "binary_threshold", "threshold": 0.5}
    if task == "multiclass":
        return {"type": "argmax"}
    if task == "dr_grade":
        return {"type": "ordinal_cutpoints", "score": "expected_grade",
                "cutpoints": [k + 0.5 for k in range(num_classes - 1)]}
    if task == "multilabel":
        return {"type": "per_class_thresholds", "thresholds": [0.5] * num_classes}
    raise ValueError(f"Unknown task {task!r}")


_RULE_TYPES = {"binary": "binary_threshold", "multiclass": "argmax",
               "dr_grade": "ordinal_cutpoints", "multilabel": "per_class_thresholds"}


def read_decision(path: pathlib.Path, task: str,
                  num_classes: int) -> tuple[dict, float | list[float]]:
    """(rule, temperature) from thresholds.json, or the defaults when the file is absent.

    The file is evaluate's {"task", "head", "temperature", "decision": rule}
    (see evaluation/report.py); a bare rule ({"type": ...}) is accepted too.
    Temperature: a float, or a list of C floats (per-label multilabel calibration).
    """
    if not path.is_file():
        return default_rule(task, num_classes), 1.0
    data = json.loads(path.read_text())
    rule = data if "type" in data else data.get("decision", data.get("rule"))
    if not isinstance(rule, dict) or rule.get("type") != _RULE_TYPES[task]:
        raise ValueError(f"{path}: expected a {_RULE_TYPES[task]!r} decision rule for task "
                         f"{task!r}, got {rule!r}")
    temperature = data.get("temperature")
    if temperature is None:
        return rule, 1.0
    if isinstance(temperature, list):
        return rule, [float(t) for t in temperature]
    return rule, float(temperature)


def apply_rule(rule: dict, probs):
    """keras.ops twin of `evaluation.thresholds.apply_rule`: probabilities -> int32 decision.

    Args:
        probs: float32 [B, K] class probabilities ([B, 2] for binary), or [B, C] per label.
    Returns:
        int32 [B] (binary / multiclass / dr_grade) or [B, C] (multilabel).
    """
    kind = rule["type"]
    if kind == "binary_threshold":
        return ops.cast(probs[:, 1] >= rule["threshold"], "int32")
    if kind == "argmax":
        return _first_argmax(probs)
    if kind == "ordinal_cutpoints":
        k = ops.cast(ops.arange(probs.shape[-1]), "float32")
        score = ops.sum(probs * k[None, :], axis=-1)
        cuts = ops.convert_to_tensor(np.asarray(rule["cutpoints"], np.float32))
        return ops.sum(ops.cast(score[:, None] >= cuts[None, :], "int32"), axis=-1)
    if kind == "per_class_thresholds":
        t = ops.convert_to_tensor(np.asarray(rule["thresholds"], np.float32))
        return ops.cast(probs >= t[None, :], "int32")
    raise ValueError(f"Unknown decision rule {kind!r}")


def _first_argmax(probs):
    """int32 [B]: index of the first maximum of [B, K], as np.argmax.

    Not ops.argmax: on TF, Keras implements it with a Bitcast (to order -0.0
    and 0.0) that ONNX cannot hold.
    """
    k = probs.shape[-1]
    is_max = probs >= ops.max(probs, axis=-1, keepdims=True)
    reverse_index = ops.cast(k - ops.arange(k), "int32")[None, :]  # K .. 1
    return k - ops.max(ops.where(is_max, reverse_index, 0), axis=-1)


def postprocess(logits, spec: ServingSpec) -> dict:
    """Logits float32 [B, D] -> {"probabilities": float32 [B, K], decision: int32} (keras.ops)."""
    temperature = np.asarray(spec.temperature, np.float32)
    probs = heads.probabilities(ops.cast(logits, "float32") / temperature, spec.head)
    return {"probabilities": probs, spec.decision_name: apply_rule(spec.rule, probs)}


# --------------------------------------------------------------------------- model


def infer_head(model: keras.Model, task: str, num_classes: int) -> str:
    """The head of a `models.build_model` model, read off its "logits" layer.

    CORAL has its own layer type; otherwise the logits width D tells the heads
    apart (K-1 for CORN, K for softmax; 1 for a sigmoid binary head).
    """
    layer = model.get_layer("logits")
    if isinstance(layer, heads.CoralDense):
        return "coral"
    width = int(layer.output.shape[-1])
    for head in heads.HEADS[task]:
        if head != "coral" and heads.output_dim(task, num_classes, head) == width:
            return head
    raise ValueError(f"Logits width {width} fits no {task!r} head for {num_classes} classes")


def _float32_config(config):
    """A model config with every mixed-precision dtype policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy":
            name = config.get("config", {}).get("name", "")
            if name.startswith("mixed_"):
                return {**config, "config": {**config["config"], "name": "float32"}}
        return {k: _float32_config(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_float32_config(v) for v in config]
    if isinstance(config, str) and config.startswith("mixed_"):
        return "float32"
    return config


def as_float32(model: keras.Model) -> keras.Model:
    """The model itself if it computes in float32, else a float32 twin with its weights.

    A mixed_float16 model exports but computes in float16 (rel. error ~1e-4,
    docs/PITFALLS.md section 8), so it is rebuilt from its config under float32.
    """
    if all(not layer.dtype_policy.name.startswith("mixed_") for layer in _all_layers(model)):
        return model
    twin = model.__class__.from_config(_float32_config(model.get_config()))
    twin.set_weights(model.get_weights())
    return twin


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def image_size(model: keras.Model) -> int:
    """S of a model whose input is [B, S, S, 3]."""
    shape = model.inputs[0].shape
    if shape[1] is None or shape[1] != shape[2]:
        raise ValueError(f"Expected a square fixed-size model input, got {shape}")
    return int(shape[1])


def spec_from_dataset(model: keras.Model, dataset_info: dict,
                      thresholds_path: pathlib.Path | None = None) -> ServingSpec:
    """ServingSpec from dataset.json and (optional) thresholds.json; refuses LAB-CLAHE datasets."""
    task = dataset_info["task"]
    class_names = tuple(str(c) for c in dataset_info["class_names"])
    num_classes = int(dataset_info.get("num_classes", len(class_names)))
    preprocess = preprocessing.PreprocessConfig.from_dataset_info(dataset_info,
                                                                   image_size(model))
    rule, temperature = read_decision(thresholds_path or pathlib.Path("/nonexistent"), task,
                                      num_classes)
    if isinstance(temperature, list):
        temperature = tuple(temperature)
    return ServingSpec(task=task, head=infer_head(model, task, num_classes),
                       class_names=class_names, rule=rule, preprocess=preprocess,
                       temperature=temperature)


def load_workdir(workdir: str | pathlib.Path) -> tuple[keras.Model, ServingSpec, dict]:
    """(float32 model with the best weights, ServingSpec, dataset.json) of a training workdir."""
    from training import experiment  # heavy (gin, callbacks); only for workdir use

    workdir = pathlib.Path(workdir)
    model, dataset_info, config = experiment.build_from_config(str(workdir))
    model = as_float32(model)  # build_from_config already builds float32; a safety net
    spec = spec_from_dataset(model, dataset_info, workdir / "eval" / "thresholds.json")
    if config.get("head") and config["head"] != spec.head:
        raise ValueError(f"Config head {config['head']!r} but the model looks like "
                         f"{spec.head!r}")
    return model, spec, dataset_info


# --------------------------------------------------------------------------- serving functions


def tensor_fn(model: keras.Model, spec: ServingSpec):
    """f(image float32 [B, S, S, 3] in [0, 255]) -> postprocess dict; backend-agnostic."""
    def serve_tensor(image):
        return postprocess(model(image, training=False), spec)
    return serve_tensor


def bytes_fn(serve_tensor, spec: ServingSpec):
    """f(image_bytes tf.string [B]) -> outputs with class_names and per-image status;
    TF ops around serve_tensor."""
    names = tf.constant(list(spec.class_names))

    def serve(image_bytes):
        images, status = preprocessing.serving_batch(image_bytes, spec.preprocess)
        out = dict(serve_tensor(images))
        batch = tf.shape(image_bytes)[0]
        out["class_names"] = tf.broadcast_to(names[None, :], [batch, len(spec.class_names)])
        out.update(status)
        out["field_circle"] = out.pop("circle")
        return out
    return serve


def bytes_spec() -> tf.TensorSpec:
    return tf.TensorSpec([None], tf.string, name="image_bytes")


def tensor_spec(size: int) -> tf.TensorSpec:
    return tf.TensorSpec([None, size, size, 3], tf.float32, name="image")


def in_memory_predictor(model: keras.Model, spec: ServingSpec):
    """The exported `serving_default` as a tf.function, without writing anything."""
    fn = tf.function(tensor_fn(model, spec),
                     input_signature=[tensor_spec(spec.preprocess.model_image_size)])
    return tf.function(bytes_fn(fn, spec), input_signature=[bytes_spec()])


# --------------------------------------------------------------------------- writing


def next_version(export_dir: pathlib.Path) -> int:
    """1 + the largest integer-named sub-directory of export_dir (1 when none)."""
    versions = [int(p.name) for p in export_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def _version_dir(export_dir, version: int | None) -> pathlib.Path:
    export_dir = pathlib.Path(export_dir)
    version = next_version(export_dir) if version is None else int(version)
    out = export_dir / str(version)
    export_dir.mkdir(parents=True, exist_ok=True)
    if out.exists():
        raise FileExistsError(f"{out} exists; pick another --version or remove it")
    return out


def _publish(tmp: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Renames a finished temp dir into place: TF Serving never sees a half-written version."""
    tmp.rename(out)
    return out


def write_saved_model(model: keras.Model, spec: ServingSpec, export_dir,
                      version: int | None = None, model_card: str | None = None) -> pathlib.Path:
    """Writes `export_dir/version/` (SavedModel + fundusflow.json [+ model_card.md]).

    Returns the version directory.
    """
    out = _version_dir(export_dir, version)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    archive = keras.export.ExportArchive()
    archive.track(model)
    # Endpoint order matters: the first one added is aliased to serving_default
    # unless one is named so; ours is named explicitly.
    serve_tensor = archive.add_endpoint(
        "serve_tensor", tensor_fn(model, spec),
        input_signature=[tensor_spec(spec.preprocess.model_image_size)])
    archive.add_endpoint("serving_default", bytes_fn(serve_tensor, spec),
                         input_signature=[bytes_spec()])
    archive.write_out(str(tmp), verbose=False)
    (tmp / METADATA_JSON).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    if model_card is not None:
        (tmp / "model_card.md").write_text(model_card)
    return _publish(tmp, out)


# --------------------------------------------------------------------------- ONNX


@keras.saving.register_keras_serializable(package="fundusflow")
class ErfGelu(keras.layers.Layer):
    """Exact GELU written as 0.5 x (1 + erf(x / sqrt 2)): tf2onnx has Erf but not Erfc."""

    def call(self, x):
        return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))


def _is_depthwise_grouped(layer) -> bool:
    return (type(layer) is keras.layers.Conv2D and layer.groups > 1
            and layer.groups == layer.filters == layer.input.shape[-1])


def _onnx_layer(layer):
    """clone_function: grouped convs that are depthwise -> DepthwiseConv2D; GELU -> erf form."""
    if _is_depthwise_grouped(layer):
        return keras.layers.DepthwiseConv2D(
            layer.kernel_size, strides=layer.strides, padding=layer.padding,
            dilation_rate=layer.dilation_rate, use_bias=layer.use_bias,
            activation=layer.activation, dtype=layer.dtype_policy, name=layer.name)
    if (type(layer) is keras.layers.Activation
            and layer.activation is keras.activations.gelu):
        return ErfGelu(dtype=layer.dtype_policy, name=layer.name)
    return layer.__class__.from_config(layer.get_config())


def _copy_weights(source: keras.Model, clone: keras.Model) -> None:
    """Weights by layer path; grouped-conv kernels [kh, kw, 1, C] -> depthwise [kh, kw, C, 1]."""
    for old, new in zip(_all_layers(source), _all_layers(clone), strict=True):
        if isinstance(old, keras.Model) or not old.weights:
            continue
        weights = old.get_weights()
        if _is_depthwise_grouped(old):
            weights[0] = np.transpose(weights[0], (0, 1, 3, 2))
        new.set_weights(weights)


def onnx_friendly(model: keras.Model) -> keras.Model:
    """The model, or a clone that tf2onnx converts (docs/PITFALLS.md section 8).

    Keras runs a grouped Conv2D inside a nested jit-compiled function, which
    tf2onnx leaves as an unconvertible StatefulPartitionedCall, and exact GELU
    lowers to Erfc, which tf2onnx lacks (ConvNeXt has both). The clone swaps
    them for DepthwiseConv2D and the erf form, with the same weights.
    """
    layers = list(_all_layers(model))
    if not any(_is_depthwise_grouped(layer) or (
            type(layer) is keras.layers.Activation
            and layer.activation is keras.activations.gelu) for layer in layers):
        return model
    clone = keras.models.clone_model(model, clone_function=_onnx_layer, recursive=True)
    _copy_weights(model, clone)
    return clone


def onnx_fn(model: keras.Model, spec: ServingSpec):
    """Tensor-in function for ONNX: logits too, so clients can re-calibrate."""
    def serve(image):
        logits = model(image, training=False)
        return {"logits": logits, **postprocess(logits, spec)}
    return serve


def preprocessing_json(spec: ServingSpec) -> dict:
    """What an ONNX client must do before the model (the graph cannot decode images)."""
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
               rtol: float = 1e-4) -> float:
    """Runs the ONNX model and the Keras model on the same random pixels.

    Returns the relative difference of the logits, max|a - b| / max|b|; raises
    RuntimeError above `rtol`.
    """
    import onnxruntime

    s = image_size(model)
    x = np.random.default_rng(0).uniform(0, 255, (batch, s, s, 3)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x}), strict=True))
    want = ops.convert_to_numpy(model(x, training=False))
    rel = float(np.max(np.abs(got["logits"] - want)) / max(np.max(np.abs(want)), 1e-12))
    if not rel < rtol:
        raise RuntimeError(f"ONNX logits differ from Keras: relative difference {rel:.2e}")
    return rel


def write_onnx(model: keras.Model, spec: ServingSpec, export_dir, version: int | None = None,
               model_card: str | None = None) -> pathlib.Path:
    """Writes `export_dir/version/{model.onnx, preprocessing.json[, model_card.md]}`.

    The ONNX model is the tensor-in model (float32 [B, S, S, 3] in [0, 255]) with
    outputs logits, probabilities and the decision; decoding and fundus
    cropping are the client's (preprocessing.json). Checked against Keras.
    """
    out = _version_dir(export_dir, version)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    convertible = onnx_friendly(model)
    archive = keras.export.ExportArchive()
    archive.track(convertible)
    archive.add_endpoint("serve", onnx_fn(convertible, spec),
                         input_signature=[tensor_spec(spec.preprocess.model_image_size)])
    with tempfile.TemporaryDirectory() as saved_model:
        archive.write_out(saved_model, verbose=False)
        _convert_onnx(pathlib.Path(saved_model), tmp / "model.onnx")
    check_onnx(model, tmp / "model.onnx")
    (tmp / PREPROCESSING_JSON).write_text(json.dumps(preprocessing_json(spec), indent=2) + "\n")
    if model_card is not None:
        (tmp / "model_card.md").write_text(model_card)
    return _publish(tmp, out)


# --------------------------------------------------------------------------- model card

NOTICE = ("**Not a medical device.** This model is a research artefact. It has not been "
          "cleared or approved by any regulator (e.g. FDA, EU MDR) and must not be used to "
          "diagnose, screen, triage or decide the treatment of any patient.")


def _split_rows(dataset_info: dict, class_names) -> list[str]:
    rows = ["| split | images | " + " | ".join(class_names) + " |",
            "|---|---|" + "---|" * len(class_names)]
    for split, info in (dataset_info.get("splits") or {}).items():
        counts = info.get("class_counts") or []
        rows.append(f"| {split} | {info.get('num_examples', '?')} | "
                    + " | ".join(str(c) for c in counts) + " |")
    return rows


def _metric_sections(metrics: dict | None) -> list[str]:
    """Headline metrics with their intervals, per split (metrics.json of evaluate)."""
    if not metrics:
        return ["No evaluation found (W/eval/metrics.json); run evaluate.py before relying "
                "on this model."]
    by_split = {"": metrics} if "headline" in metrics else {
        k: v for k, v in metrics.items() if isinstance(v, dict) and "headline" in v}
    lines = []
    for split, m in by_split.items():
        lines += [f"**{split or 'evaluation'}**: {m.get('num_examples', '?')} images, "
                  f"{m.get('num_patients', '?')} patients.", "",
                  "| metric | value | 95% CI |", "|---|---|---|"]
        for name in m["headline"]:
            value = m["metrics"].get(name)
            ci = (m.get("confidence_intervals") or {}).get(name) or {}
            interval = (f"[{ci['low']:.3f}, {ci['high']:.3f}]" if ci.get("low") is not None
                        else ci.get("reason", "not computed"))
            shown = "undefined" if value is None else f"{value:.3f}"
            lines.append(f"| {name} | {shown} | {interval} |")
        lines.append("")
    return lines or ["metrics.json holds no headline metrics."]


def _preprocessing_text(pp: preprocessing.PreprocessConfig) -> str:
    crop = "fundus circle crop to its bounding square" if pp.crop == "fundus" else "no crop"
    clahe = (f" -> CLAHE on the green channel (clip limit {pp.clahe_clip_limit}, "
             f"{pp.clahe_tile_grid}x{pp.clahe_tile_grid} tiles)" if pp.clahe else "")
    ben = f" -> Ben Graham (sigma {pp.ben_graham_sigma} at 512 px)" if pp.ben_graham else ""
    return (f"Decode (RGB) -> {crop} -> resize to {pp.image_size} px{clahe}{ben} -> "
            f"resize to the model input {pp.model_image_size} px, pixels in [0, 255] "
            "(normalisation inside the model).")


def gradability_section(pp: preprocessing.PreprocessConfig, fmt: str) -> list[str]:
    """Model-card lines on the per-image status outputs (SavedModel only)."""
    if fmt != "saved_model":
        return []
    return [
        "## Image quality and errors", "",
        "Every image gets probabilities, but check two flags first. `ok` is false (and "
        "`error` says why) when the bytes could not be used: empty, not an image, "
        "truncated, corrupt JPEG data, above the pixel or decoded-size cap; ignore that "
        "image's probabilities. `gradable` is false when `quality` lists a reason: "
        f"`no_fundus_field` (no circular field of view found), `too_dark` (mean luma in "
        f"the field below {pp.dark_threshold:g} of 255), `small_field` (field diameter "
        f"below {pp.small_field_fraction:g} of the shorter side or {pp.small_field_pixels:g}"
        " original pixels). These are the checks and thresholds prepare recorded for the "
        "training images (same code); the model was not trained to recognise ungradable "
        "images, so its output on them is not meaningful.", ""]


def model_card(spec: ServingSpec, dataset_info: dict, metrics: dict | None = None, *,
               title: str = "fundusflow model", fmt: str = "saved_model") -> str:
    """Markdown model card: task, classes, data, metrics, rule, pre-processing, use, limits."""
    pp = spec.preprocess
    rows = dataset_info.get("rows") or {}
    temperature = spec.to_json()["temperature"]
    signature = ("`serving_default`: `image_bytes` (tf.string [B], JPEG/PNG) -> "
                 f"`probabilities`, `{spec.decision_name}`, `class_names`; `serve_tensor`: "
                 f"`image` float32 [B, {pp.model_image_size}, {pp.model_image_size}, 3] "
                 "in [0, 255]" if fmt == "saved_model" else
                 f"`model.onnx`: `image` float32 [B, {pp.model_image_size}, "
                 f"{pp.model_image_size}, 3] in [0, 255] -> logits, probabilities, "
                 f"`{spec.decision_name}`; the client pre-processes (preprocessing.json)")
    lines = [
        f"# {title}", "", NOTICE, "",
        "## Model", "",
        f"- Task: `{spec.task}` (head `{spec.head}`), {len(spec.class_names)} classes: "
        + ", ".join(f"`{c}`" for c in spec.class_names),
        f"- Interface: {signature}",
        "",
        "## Training data", "",
        f"Source: {json.dumps(dataset_info.get('source', {}))}. Rows read "
        f"{rows.get('read', '?')}, written {rows.get('written', '?')}, rejected "
        f"{rows.get('rejected', '?')}; dropped classes: "
        f"{dataset_info.get('dropped_classes') or 'none'}; balance: "
        f"{dataset_info.get('balance', '?')}. Counts per class (positives per label for "
        "multilabel):", "",
        *_split_rows(dataset_info, spec.class_names), "",
        "## Evaluation", "", *_metric_sections(metrics), "",
        "## Decision rule", "",
        f"Temperature {temperature}; rule `{spec.rule['type']}`: "
        f"`{json.dumps({k: v for k, v in spec.rule.items() if k != 'details'})}`.", "",
        "## Pre-processing", "",
        _preprocessing_text(pp), "",
        *gradability_section(pp, fmt),
        "## Intended use", "",
        "Research and education on retinal images like the training data (same cameras, "
        "populations and grading protocol); comparison of methods; a starting point for "
        "properly validated development.", "",
        "## Limitations", "",
        "- Validated only on the splits above; performance on other cameras, populations, "
        "image quality or disease prevalence is unknown and likely lower.",
        "- Ungradable, non-fundus or very dark images still receive a prediction.",
        "- Confidence intervals come from a patient-level bootstrap of one test split.",
        "- Grad-CAM maps are not evidence that the model uses clinically meaningful features.",
        "", NOTICE, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


def _read_json(path: pathlib.Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def export_workdir(workdir, export_dir, version: int | None = None,
                   fmt: str = "saved_model") -> pathlib.Path:
    """Exports a training workdir (best weights, tuned rule) as `export_dir/version/`."""
    workdir = pathlib.Path(workdir)
    model, spec, dataset_info = load_workdir(workdir)
    card = model_card(spec, dataset_info, _read_json(workdir / "eval" / "metrics.json"),
                      title=f"fundusflow {spec.task} model ({workdir.name})", fmt=fmt)
    if fmt == "saved_model":
        return write_saved_model(model, spec, export_dir, version, card)
    if fmt == "onnx":
        return write_onnx(model, spec, export_dir, version, card)
    raise ValueError(f"Unknown format {fmt!r}; expected 'saved_model' or 'onnx'")

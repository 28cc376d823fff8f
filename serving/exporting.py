"""Export a trained model for serving: SavedModel with an image-bytes signature.

The SavedModel written to `E/N/` (TF Serving's versioned layout) has two signatures:

| signature         | input                                    | outputs                          |
| ----------------- | ---------------------------------------- | -------------------------------- |
| `serving_default` | `image_bytes` tf.string [B] (JPEG/PNG)   | probabilities, decision, names   |
| `serve_tensor`    | `image` float32 [B, S, S, 3] in [0, 255] | probabilities, decision          |

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

The decision rule is the one `evaluate` tuned (W/eval/thresholds.json, read by
`evaluation.thresholds.read_decision`; untuned defaults when absent), applied in
the graph by `models.decision.decide` after temperature scaling: the same function
evaluate.py and the training metrics call. When thresholds.json says `"tta": true`
(evaluate.py --tta), the graph averages the logits of the image and its flips
(`models.decision.served_logits`), as evaluation did; the model card says which.

Backends: the model and the post-processing (`postprocess`) use keras.ops
only and sit in the `serve_tensor` endpoint; the TF-only image decoding wraps
that endpoint. On the JAX backend ExportArchive converts endpoints with
jax2tf, which cannot hold TF string/decode ops: that is why the decode is kept outside;
only the TF backend is tested (future work: run and test on JAX).
"""

import dataclasses
import json
import pathlib
import shutil

import keras
import tensorflow as tf

from evaluation import thresholds
from input_pipeline import preprocessing
from models import decision, heads
from serving import model_card as cards

METADATA_JSON = "fundusflow.json"
DECISION_NAMES = {"dr_grade": "grade", "binary": "class_id", "multiclass": "class_id",
                  "multilabel": "labels"}


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """Everything besides the weights that the served graph needs."""

    task: str
    head: str
    class_names: tuple[str, ...]
    rule: dict  # a models.decision rule ({"type": ..., ...})
    preprocess: preprocessing.PreprocessConfig  # with model_image_size set
    temperature: float | tuple[float, ...] = 1.0  # logits are divided by it
    tta: bool = False  # average the logits of the image and its flips (rule tuned so)

    @property
    def decision_name(self) -> str:
        return DECISION_NAMES[self.task]

    def to_json(self) -> dict:
        return {"task": self.task, "head": self.head, "class_names": list(self.class_names),
                "decision_output": self.decision_name, "decision_rule": self.rule,
                "temperature": (list(self.temperature) if isinstance(self.temperature, tuple)
                                else self.temperature), "tta": self.tta,
                "preprocessing": self.preprocess.to_json()}


# --------------------------------------------------------------------------- decision rule


def postprocess(logits, spec: ServingSpec) -> dict:
    """Logits float32 [B, D] -> {"probabilities": float32 [B, K], decision: int32} (keras.ops).

    `models.decision.decide`: the same function evaluate.py applies.
    """
    out = decision.decide(logits, spec.head, spec.rule, spec.temperature)
    return {"probabilities": out["probabilities"], spec.decision_name: out["decision"]}


def served_logits(model: keras.Model, images, spec: ServingSpec):
    """Logits [B, D] of float32 [B, S, S, 3] images: flip-averaged when spec.tta (as evaluated)."""
    return decision.served_logits(model, images, spec.tta)


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

    A mixed_float16 model exports but computes in float16 (rel. error ~1e-4 against
    float32), so it is rebuilt from its config under float32.
    """
    if all(not layer.dtype_policy.name.startswith("mixed_") for layer in all_layers(model)):
        return model
    twin = model.__class__.from_config(_float32_config(model.get_config()))
    twin.set_weights(model.get_weights())
    return twin


def all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


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
    rule, temperature, tta = thresholds.read_decision(
        thresholds_path or pathlib.Path("/nonexistent"), task, num_classes)
    if isinstance(temperature, list):
        temperature = tuple(temperature)
    return ServingSpec(task=task, head=infer_head(model, task, num_classes),
                       class_names=class_names, rule=rule, preprocess=preprocess,
                       temperature=temperature, tta=tta)


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
        return postprocess(served_logits(model, image, spec), spec)
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


def version_dir(export_dir, version: int | None) -> pathlib.Path:
    export_dir = pathlib.Path(export_dir)
    if version is not None and (isinstance(version, bool) or int(version) != version
                                or version < 1):
        raise ValueError(f"version must be a positive integer (TF Serving loads only "
                         f"those), got {version!r}")
    version = next_version(export_dir) if version is None else int(version)
    out = export_dir / str(version)
    export_dir.mkdir(parents=True, exist_ok=True)
    if out.exists():
        raise FileExistsError(f"{out} exists; pick another --version or remove it")
    return out


def staging_dir(out: pathlib.Path) -> pathlib.Path:
    """An empty `.tmp-N` beside the version dir `out`, to be published into it when complete."""
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def publish(tmp: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Renames a finished temp dir into place: TF Serving never sees a half-written version."""
    tmp.rename(out)
    return out


def write_saved_model(model: keras.Model, spec: ServingSpec, export_dir,
                      version: int | None = None, model_card: str | None = None) -> pathlib.Path:
    """Writes `export_dir/version/` (SavedModel + fundusflow.json [+ model_card.md]).

    Returns the version directory.
    """
    out = version_dir(export_dir, version)
    tmp = staging_dir(out)
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
    return publish(tmp, out)


# --------------------------------------------------------------------------- entry point


def _read_json(path: pathlib.Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def export_workdir(workdir, export_dir, version: int | None = None, fmt: str = "saved_model",
                   quantization: str = "float32", data_dir: str | None = None) -> pathlib.Path:
    """Exports a training workdir (best weights, tuned rule) as `export_dir/version/`.

    fmt: "saved_model", "onnx" or "tflite" (then `quantization`: float32, float16
    or int8; int8 calibrates on the train shards of `data_dir`, default the
    workdir's own data_dir).
    """
    workdir = pathlib.Path(workdir)
    model, spec, dataset_info = load_workdir(workdir)
    external = [_read_json(p) for p in sorted(workdir.glob("eval/external/*/metrics.json"))]
    card = cards.model_card(spec, dataset_info, _read_json(workdir / "eval" / "metrics.json"),
                            external=external,
                            title=f"fundusflow {spec.task} model ({workdir.name})", fmt=fmt)
    if fmt == "saved_model":
        return write_saved_model(model, spec, export_dir, version, card)
    if fmt == "onnx":
        from serving import onnx_export  # builds on this module

        return onnx_export.write_onnx(model, spec, export_dir, version, card)
    if fmt == "tflite":
        from serving import tflite_export  # builds on this module
        from training import experiment

        representative = None
        if quantization == "int8":
            # load_workdir parsed the workdir's operative config: gin holds its data_dir.
            data_dir = data_dir or experiment.resolved_train_config()["data_dir"]
            representative = tflite_export.representative_images(data_dir, spec)
        return tflite_export.write_tflite(model, spec, export_dir, version, card,
                                          quantization, representative)
    raise ValueError(f"Unknown format {fmt!r}; expected 'saved_model', 'onnx' or 'tflite'")

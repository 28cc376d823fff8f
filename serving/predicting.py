"""Batch prediction on image files with an exported SavedModel or a training workdir.

Files are read on the host (missing, unreadable, empty files get their `error`
row); formats the graph cannot decode (TIFF, WebP, ...) are transcoded to PNG
losslessly (`preprocessing.graph_bytes`, as prepare does). Every other check
(truncated, corrupt JPEG data, pixel caps, ...) is the graph's own: it returns
`ok` / `error` per image, so one bad file never fails its batch. If a batch
still fails inside the graph, its images are retried one by one.

CSV columns: path, p_<class> for every class (or label), the decision
(`grade` / `class_id` with its `class_name`, or `labels`: the present labels
joined by ";"), gradable (true / false, empty on error), quality (the
reasons an image is ungradable, ";"-joined: no_fundus_field, too_dark,
small_field), error ("" when predicted).
"""

import csv
import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from evaluation import gradcam
from input_pipeline import preprocessing
from serving import exporting

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class InputError(Exception):
    """A file that cannot be predicted; the message is the CSV's `error`."""


def find_images(paths: Iterable[str | pathlib.Path]) -> list[pathlib.Path]:
    """Files as given plus, for folders, every image below them (recursive, sorted).

    A named file is kept whatever its extension (so it gets a row, maybe an error);
    inside folders only IMAGE_EXTENSIONS count. A missing path raises FileNotFoundError.
    """
    found = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return found


def read_for_serving(path: pathlib.Path) -> bytes:
    """Bytes the serving signature can decode; raises InputError with the reason."""
    try:
        return preprocessing.graph_bytes(preprocessing.read_file(path))[0]
    except preprocessing.ImageError as e:
        raise InputError(e.reason) from e


# --------------------------------------------------------------------------- predictors


@dataclasses.dataclass
class Predictor:
    """Encoded images -> numpy outputs, plus what is needed to name them."""

    fn: Callable[[tf.Tensor], dict]  # tf.string [B] -> {"probabilities", decision, ...}
    task: str
    class_names: tuple[str, ...]
    decision_name: str
    model: object = None  # the Keras model (workdir only; Grad-CAM needs it)
    spec: exporting.ServingSpec | None = None

    def __call__(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        out = self.fn(tf.constant(list(images)))
        return {k: v.numpy() for k, v in out.items() if k != "class_names"}


def from_saved_model(path: str | pathlib.Path) -> Predictor:
    """A Predictor running `serving_default` of an exported version directory."""
    path = pathlib.Path(path)
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    meta = json.loads((path / exporting.METADATA_JSON).read_text())
    return Predictor(fn=lambda b: signature(image_bytes=b), task=meta["task"],
                     class_names=tuple(meta["class_names"]),
                     decision_name=meta["decision_output"])


def from_workdir(workdir: str | pathlib.Path) -> Predictor:
    """A Predictor running the export graph in memory on a training workdir's model."""
    model, spec, _ = exporting.load_workdir(workdir)
    return from_model(model, spec)


def from_model(model, spec: exporting.ServingSpec) -> Predictor:
    return Predictor(fn=exporting.in_memory_predictor(model, spec), task=spec.task,
                     class_names=spec.class_names, decision_name=spec.decision_name,
                     model=model, spec=spec)


# --------------------------------------------------------------------------- prediction


def _predict_batch(predictor: Predictor, images: list[bytes]) -> list[dict | str]:
    """Outputs per image, or an error string where the graph rejected that image."""
    try:
        out = predictor(images)
        return [{k: v[i] for k, v in out.items()} for i in range(len(images))]
    except tf.errors.InvalidArgumentError:
        if len(images) == 1:
            return ["the serving graph could not decode this image"]
        return [r for image in images for r in _predict_batch(predictor, [image])]


def _row(path: pathlib.Path, predictor: Predictor, result: dict | str) -> dict:
    row = {"path": str(path)}
    row.update({f"p_{c}": "" for c in predictor.class_names})
    if not isinstance(result, str) and not result.get("ok", True):
        result = result["error"].decode()  # the graph's own check failed
    if isinstance(result, str):
        return {**row, predictor.decision_name: "", "class_name": "", "gradable": "",
                "quality": "", "error": result}
    for name, p in zip(predictor.class_names, result["probabilities"], strict=True):
        row[f"p_{name}"] = f"{p:.6f}"
    row.update(gradable=str(bool(result["gradable"])).lower(),
               quality=result["quality"].decode(), error="")
    decision = result[predictor.decision_name]
    if predictor.decision_name == "labels":
        names = [c for c, on in zip(predictor.class_names, decision, strict=True) if on]
        return {**row, "labels": ";".join(names)}
    return {**row, predictor.decision_name: int(decision),
            "class_name": predictor.class_names[int(decision)]}


def columns(predictor: Predictor) -> list[str]:
    decision = ([predictor.decision_name] if predictor.decision_name == "labels"
                else [predictor.decision_name, "class_name"])
    return ["path", *[f"p_{c}" for c in predictor.class_names], *decision, "gradable",
            "quality", "error"]


def predict_files(predictor: Predictor, paths: Sequence[pathlib.Path], batch_size: int = 16,
                  gradcam_dir: str | pathlib.Path | None = None,
                  progress: bool = True) -> list[dict]:
    """One CSV row (dict) per path, in order; bad files get their `error`."""
    rows = []
    with tqdm(total=len(paths), unit="img", disable=not progress or len(paths) <= batch_size,
              desc="predict") as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            rows += _predict_chunk(predictor, chunk, start, gradcam_dir)
            bar.update(len(chunk))
    return rows


def _predict_chunk(predictor: Predictor, chunk: Sequence[pathlib.Path], offset: int,
                   gradcam_dir) -> list[dict]:
    results: list[dict | str] = []
    good: dict[int, bytes] = {}
    for i, path in enumerate(chunk):
        try:
            good[i] = read_for_serving(path)
            results.append("")
        except InputError as e:
            results.append(str(e))
    if good:
        for i, result in zip(good, _predict_batch(predictor, list(good.values())), strict=True):
            results[i] = result
        if gradcam_dir is not None:
            ok = {i: good[i] for i in good
                  if not isinstance(results[i], str) and results[i]["ok"]}
            _write_gradcams(predictor, ok, [results[i] for i in ok], chunk, offset, gradcam_dir)
    return [_row(path, predictor, r) for path, r in zip(chunk, results, strict=True)]


def write_csv(rows: list[dict], fieldnames: list[str], path: str | pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------- Grad-CAM


def _gradcam_target(predictor: Predictor, results: list[dict]) -> dict:
    """What to explain: E[grade] for dr_grade, else the decided (or most likely) class."""
    spec = predictor.spec
    if spec.task == "dr_grade":
        return {"score_fn": gradcam.expected_grade_score(spec.head)}
    if spec.head == "sigmoid" and spec.task == "binary":
        return {"target": 0}  # the one logit is the positive class's
    if spec.task == "multilabel":
        return {"target": np.array([int(np.argmax(r["probabilities"])) for r in results])}
    return {"target": np.array([int(r[spec.decision_name]) for r in results])}


def _write_gradcams(predictor: Predictor, images: dict[int, bytes], results: list[dict],
                    chunk: Sequence[pathlib.Path], offset: int, gradcam_dir) -> None:
    """Writes <gradcam_dir>/<index>_<stem>.png overlays for the predicted images."""
    if not images:
        return
    if predictor.model is None:
        raise ValueError("Grad-CAM needs the Keras model: use --workdir, not --model")
    x = preprocessing.serving_batch(tf.constant(list(images.values())),
                                    predictor.spec.preprocess)[0].numpy()
    cams = gradcam.gradcam(predictor.model, x, **_gradcam_target(predictor, results))
    for i, image, cam in zip(images, x, cams, strict=True):
        name = f"{offset + i:05d}_{chunk[i].stem}.png"
        gradcam.save_png(pathlib.Path(gradcam_dir) / name, gradcam.overlay(image, cam))

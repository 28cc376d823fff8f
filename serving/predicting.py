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
import errno
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Sequence

import cv2
import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from evaluation import gradcam
from input_pipeline import preprocessing
from serving import exporting

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class InputError(Exception):
    """A file that cannot be predicted; the message is the CSV's `error`."""


# What can be predicted: an image file's path, or a uint8 RGB array [H, W, 3].
Source = pathlib.Path | np.ndarray


def find_images(paths: Iterable[str | pathlib.Path]) -> list[pathlib.Path]:
    """Files as given plus, for folders, every image below them (recursive, sorted).

    A named file is kept whatever its extension, and a missing one too, so each
    gets a row (maybe an error). Inside folders only IMAGE_EXTENSIONS count,
    broken symlinks (dangling or looping) included: they get an error row.
    """
    found = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                            and (p.is_file() or _is_broken_link(p)))
        else:
            found.append(path)
    return found


def _is_broken_link(path: pathlib.Path) -> bool:
    return path.is_symlink() and not path.exists()  # exists() is False on ELOOP too


def _missing_reason(path: pathlib.Path) -> str:
    """Why a path that does not resolve to a file cannot be read."""
    if not path.is_symlink():
        return "no such file"
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
    return f"dangling symlink (its target {os.readlink(path)} does not exist)"


def read_for_serving(path: pathlib.Path) -> bytes:
    """Bytes the serving signature can decode; raises InputError with the reason."""
    if not path.exists():
        raise InputError(_missing_reason(path))
    if path.is_dir():
        raise InputError("a folder, not an image file")
    try:
        return preprocessing.graph_bytes(preprocessing.read_file(path))[0]
    except preprocessing.ImageError as e:
        raise InputError(e.reason) from e


def encode_array(image: np.ndarray) -> bytes:
    """A raw photograph, uint8 RGB [H, W, 3], as PNG bytes (lossless) for `serving_default`.

    Raises InputError for any other dtype or shape.
    """
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[-1] == 3 and min(image.shape[:2]) > 0):
        shape = list(getattr(image, "shape", []))
        raise InputError(f"expected a uint8 RGB array [H, W, 3], got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {shape}")
    return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def read_source(source: Source) -> bytes:
    """Encoded bytes of a file path or an array; raises InputError with the reason."""
    if isinstance(source, np.ndarray):
        return encode_array(source)
    return read_for_serving(pathlib.Path(source))


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

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Predictor":
        """An exported SavedModel version directory (E/N) or a training workdir (W)."""
        path = pathlib.Path(path)
        if (path / exporting.METADATA_JSON).is_file():
            return from_saved_model(path)
        if (path / "operative_config.gin").is_file():
            return from_workdir(path)
        raise FileNotFoundError(f"{path}: neither an exported model version (no "
                                f"{exporting.METADATA_JSON}) nor a training workdir (no "
                                "operative_config.gin)")

    def predict(self, inputs, batch_size: int = 16) -> pd.DataFrame:
        """predict.py's CSV as a DataFrame, one row per input, in order.

        Args:
            inputs: an image path, a uint8 RGB array [H, W, 3] (a raw photograph,
                not pre-processed), or a list mixing them; folders are searched as
                predict.py does. A [N, H, W, 3] uint8 array counts as N photographs.
        Returns:
            The columns of `columns(self)`: `path` (the file, or `array[i]` for an
            array, i its row), probabilities (float, NaN on error rows), the
            decision (Int64, <NA> on error rows; `labels` stays a ";"-joined string)
            and `error` ("" when predicted). Bad inputs get their `error`, never raise.
        """
        rows = predict_files(self, _sources(inputs), batch_size, progress=False)
        return _typed(pd.DataFrame(rows, columns=columns(self)), self)


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


def _sources(inputs) -> list[Source]:
    """Predictor.predict's inputs as a flat list of paths and [H, W, 3] arrays."""
    if isinstance(inputs, np.ndarray):
        return list(inputs) if inputs.ndim == 4 else [inputs]
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    sources = []
    for item in inputs:
        if isinstance(item, np.ndarray):
            sources.append(item)
        else:
            sources += find_images([item])
    return sources


def _typed(frame: pd.DataFrame, predictor: Predictor) -> pd.DataFrame:
    """CSV strings -> float probabilities (NaN when empty) and an Int64 decision (<NA>)."""
    for name in frame.columns:
        if name.startswith("p_"):
            frame[name] = pd.to_numeric(frame[name].replace("", None)).astype("float64")
    if predictor.decision_name != "labels":
        decision = frame[predictor.decision_name].replace("", None)
        frame[predictor.decision_name] = decision.astype("Int64")
    return frame


def _name(source: Source, index: int) -> str:
    """The `path` cell of a source: the file, or `array[i]` (i: its row)."""
    return f"array[{index}]" if isinstance(source, np.ndarray) else str(source)


def _row(path: str | pathlib.Path, predictor: Predictor, result: dict | str) -> dict:
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


def predict_files(predictor: Predictor, paths: Sequence[Source], batch_size: int = 16,
                  gradcam_dir: str | pathlib.Path | None = None,
                  progress: bool = True) -> list[dict]:
    """One CSV row (dict) per path (or array), in order; bad inputs get their `error`.

    Grad-CAM overlays (`gradcam_dir`) are named after the files: paths only.
    """
    rows = []
    with tqdm(total=len(paths), unit="img", disable=not progress or len(paths) <= batch_size,
              desc="predict") as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            rows += _predict_chunk(predictor, chunk, start, gradcam_dir)
            bar.update(len(chunk))
    return rows


def _predict_chunk(predictor: Predictor, chunk: Sequence[Source], offset: int,
                   gradcam_dir) -> list[dict]:
    results: list[dict | str] = []
    good: dict[int, bytes] = {}
    for i, source in enumerate(chunk):
        try:
            good[i] = read_source(source)
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
    return [_row(_name(source, offset + i), predictor, r)
            for i, (source, r) in enumerate(zip(chunk, results, strict=True))]


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

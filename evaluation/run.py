"""What `python evaluate.py --workdir=W` does: predict, calibrate, tune, measure, report.

1. Rebuild the trained model (training.experiment.build_from_config) and predict the
   validation split and the evaluated split (optionally with flip TTA).
2. Fit the temperature on validation logits; probabilities = heads.probabilities(logits / T).
3. Tune the decision rule on the calibrated validation probabilities; apply it unchanged
   to the evaluated split.
4. Metrics with patient-level bootstrap CIs, curves, calibration, Grad-CAM gallery.

Writes to W/eval/: metrics.json, thresholds.json (read by export.py), calibration.json,
predictions_<split>.csv, report.html + figure PNGs, gradcam/*.png; figures also go to
TensorBoard under W/tensorboard/eval.
"""

import csv
import dataclasses
import glob
import json
import os
import pathlib

import numpy as np

from evaluation import calibration, gradcam, metrics, report, thresholds
from models import heads


@dataclasses.dataclass
class Predictions:
    """One split's model outputs, in file order."""

    logits: np.ndarray  # float32 [N, D]
    labels: np.ndarray  # int64 [N] or 0/1 [N, C] (multilabel)
    patient_ids: np.ndarray  # str [N], "" when unknown
    sources: np.ndarray  # str [N]


def _flips(images):
    """TTA views of a float [B, S, S, 3] batch: identity, horizontal flip, vertical flip."""
    return [images, images[:, :, ::-1], images[:, ::-1]]


def _dataset(data_dir: str, split: str, config: dict, info: dict):
    from input_pipeline import integrity, pipeline

    pattern = os.path.join(data_dir, f"{split}-*.tfrecord")
    if not glob.glob(pattern):
        raise FileNotFoundError(f"No {split} shards ({pattern}); evaluation tunes on 'val'")
    ds = pipeline.make_dataset(pattern, config["batch_size"], training=False,
                               image_size=config["image_size"], task=info["task"],
                               num_classes=info["num_classes"], with_info=True)
    return integrity.iterate_naming_corrupt_shards(ds, [pattern])  # one line, not a traceback


def predict_split(model, data_dir: str, split: str, config: dict, info: dict,
                  tta: bool = False) -> Predictions:
    """Logits for every example of `split`; with `tta`, the mean logits of the flips.

    Averaging logits (not probabilities) keeps one rule for every head: calibration and
    decisions then work on the averaged logits exactly as without TTA.
    """
    logits, labels, pids, sources = [], [], [], []
    for batch in _dataset(data_dir, split, config, info):
        images = batch["image"].numpy()
        views = _flips(images) if tta else [images]
        outs = [np.asarray(model(v, training=False), np.float32) for v in views]
        logits.append(np.mean(outs, axis=0))
        labels.append(batch["label"].numpy())
        pids.append(batch["patient_id"].numpy().astype(str))
        sources.append(batch["source"].numpy().astype(str))
    labels = np.concatenate(labels)
    return Predictions(np.concatenate(logits), labels.astype(np.int64),
                       np.concatenate(pids), np.concatenate(sources))


def _images_at(data_dir, split, config, info, indices) -> dict[int, np.ndarray]:
    """Images (float32 [S, S, 3] in [0, 255]) of the given example indices."""
    wanted, out, start = set(int(i) for i in indices), {}, 0
    for batch in _dataset(data_dir, split, config, info):
        images = batch["image"].numpy()
        for j in range(len(images)):
            if start + j in wanted:
                out[start + j] = images[j]
        start += len(images)
        if len(out) == len(wanted):
            break
    return out


def _correct(task: str, labels: np.ndarray, decisions: np.ndarray) -> np.ndarray:
    if task == "multilabel":
        return np.all(labels == decisions, axis=1)
    return labels == decisions


def gallery_indices(correct: np.ndarray, per_kind: int, seed: int = 0) -> np.ndarray:
    """Up to `per_kind` correct and `per_kind` wrong example indices, drawn reproducibly."""
    rng = np.random.default_rng(seed)
    picks = []
    for ok in (True, False):
        pool = np.flatnonzero(correct == ok)
        picks.append(rng.choice(pool, size=min(per_kind, len(pool)), replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _describe(task, class_names, y, d) -> str:
    if task == "multilabel":
        def names(v):
            return ",".join(n for n, on in zip(class_names, v, strict=True) if on) or "none"
        return f"true {names(y)} | pred {names(d)}"
    return f"true {class_names[int(y)]} | pred {class_names[int(d)]}"


def gradcam_gallery(model, task, head, data_dir, split, config, info, pred: Predictions,
                    probs, decisions, eval_dir: pathlib.Path, per_kind: int = 4) -> list[dict]:
    """Grad-CAM overlays of correct and wrong cases: report items, also written as PNGs."""
    correct = _correct(task, pred.labels, decisions)
    idx = gallery_indices(correct, per_kind)
    if len(idx) == 0:
        return []
    images = _images_at(data_dir, split, config, info, idx)
    x = np.stack([images[i] for i in idx])
    cams = gradcam.gradcam(model, x, **gradcam.default_target(task, head, probs[idx],
                                                              decisions[idx]))
    items = []
    for i, image, cam in zip(idx, x, cams, strict=True):
        rgb = gradcam.overlay(image, cam)
        name = f"{i:05d}_{'ok' if correct[i] else 'wrong'}.png"
        gradcam.save_png(eval_dir / "gradcam" / name, rgb)
        caption = (f"{_describe(task, info['class_names'], pred.labels[i], decisions[i])} "
                   f"({pred.sources[i]})")
        items.append({"png": gradcam.encode_png(rgb), "caption": caption,
                      "correct": bool(correct[i])})
    return items


def write_predictions_csv(path, task, class_names, pred: Predictions, probs, decisions) -> None:
    """One row per example: source, patient_id, label(s), decision(s), probabilities."""
    names = list(class_names)
    if task == "multilabel":
        header = (["source", "patient_id"] + [f"label_{n}" for n in names]
                  + [f"pred_{n}" for n in names] + [f"p_{n}" for n in names])
    else:
        header = ["source", "patient_id", "label", "prediction"] + [f"p_{n}" for n in names]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(len(decisions)):
            y, d = pred.labels[i], decisions[i]
            vals = [*y, *d] if task == "multilabel" else [int(y), int(d)]
            w.writerow([pred.sources[i], pred.patient_ids[i], *[int(v) for v in vals],
                        *[f"{p:.6f}" for p in probs[i]]])


def _probs(logits, temperature, head) -> np.ndarray:
    return np.asarray(heads.probabilities(calibration.apply_temperature(logits, temperature)
                                          .astype(np.float32), head), np.float64)


def _dump(path, obj) -> None:
    pathlib.Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def evaluate(workdir: str, split: str = "test", data_dir: str | None = None,
             tta: bool = False, n_boot: int = 1000, per_class_temperature: bool = False,
             gradcam_per_kind: int = 4, seed: int = 0) -> pathlib.Path:
    """Runs the whole evaluation of a training workdir; returns the report path."""
    from training import experiment

    model, info, config = experiment.build_from_config(workdir)
    task, head, names = config["task"], config["head"], info["class_names"]
    data_dir = data_dir or config["data_dir"]
    eval_dir = pathlib.Path(workdir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)

    val = predict_split(model, data_dir, "val", config, info, tta)
    test = val if split == "val" else predict_split(model, data_dir, split, config, info, tta)
    cal = calibration.calibrate(val.logits, val.labels, head, test.logits, test.labels,
                                per_class=per_class_temperature)
    val_probs = _probs(val.logits, cal["temperature"], head)
    probs = _probs(test.logits, cal["temperature"], head)
    rule = thresholds.tune_rule(task, val.labels, val_probs, names)
    decisions = thresholds.apply_rule(rule, probs)

    result = metrics.compute_metrics(task, test.labels, probs, decisions, names,
                                     test.patient_ids, n_boot=n_boot, seed=seed)
    result.update(split=split, tta=tta, workdir=str(workdir),
                  calibration={k: cal[k] for k in ("temperature", "nll", "ece")})
    thr = {"task": task, "head": head, "temperature": cal["temperature"], "decision": rule,
           "tuned_on": "val", "tta": tta, "class_names": names}
    _dump(eval_dir / "metrics.json", result)
    _dump(eval_dir / "thresholds.json", thr)
    _dump(eval_dir / "calibration.json", cal)
    write_predictions_csv(eval_dir / f"predictions_{split}.csv", task, names, test, probs,
                          decisions)
    items = gradcam_gallery(model, task, head, data_dir, split, config, info, test, probs,
                            decisions, eval_dir, gradcam_per_kind)
    curves = metrics.compute_curves(task, test.labels, probs, names)
    path = report.write_report(eval_dir, result, thr, cal, curves, items)
    report.log_to_tensorboard(pathlib.Path(workdir) / "tensorboard" / "eval",
                              report.report_pngs(eval_dir))
    return path

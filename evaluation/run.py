"""What `python evaluate.py --workdir=W` does: predict, calibrate, tune, measure, report.

1. Rebuild the trained model (training.experiment.build_from_config) and predict the
   validation split and the evaluated split (optionally with flip TTA:
   `models.decision.served_logits`, the function the export graph runs).
2. Fit the temperature on validation logits.
3. Tune the decision rule on the calibrated validation probabilities; apply it unchanged
   to the evaluated split with `models.decision.decide`, the export graph's own
   post-processing, so evaluate and the served model decide alike.
4. Metrics with bootstrap CIs (patient-level when the source has patient ids, else
   image-level), curves, calibration, Grad-CAM gallery.

Writes to W/eval/: metrics.json, thresholds.json (read by export.py), calibration.json,
predictions_<split>.csv, report.html + figure PNGs, gradcam/*.png; figures also go to
TensorBoard under W/tensorboard/eval.

External validation (`data_dir` another prepared source): steps 2-3 are not run on it;
the served decision (W/eval/thresholds.json, tuned on W's val split) is applied, and the
same files go to W/eval/external/<name of data_dir>/ (W/eval/ itself is left alone, except
thresholds.json when it did not exist yet). The training data dir stored in W's config is
found relative to the workdir's ancestors when it was relative (`resolve_data_dir`).
"""

import csv
import dataclasses
import glob
import json
import os
import pathlib

import keras
import numpy as np

from evaluation import calibration, gradcam, metrics, report, thresholds
from models import decision


@dataclasses.dataclass
class Predictions:
    """One split's model outputs, in file order."""

    logits: np.ndarray  # float32 [N, D]
    labels: np.ndarray  # int64 [N] or 0/1 [N, C] (multilabel)
    patient_ids: np.ndarray  # str [N], "" when unknown
    sources: np.ndarray  # str [N]


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
    """Logits for every example of `split`; with `tta`, the mean logits of the flips
    (`models.decision.served_logits`, the function the export graph runs)."""
    logits, labels, pids, sources = [], [], [], []
    for batch in _dataset(data_dir, split, config, info):
        out = decision.served_logits(model, batch["image"].numpy(), tta)
        logits.append(np.asarray(keras.ops.convert_to_numpy(out), np.float32))
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
    """Calibrated probabilities float64 [N, K], exactly as the served graph computes them."""
    return np.asarray(decision.calibrated_probabilities(logits, head, temperature), np.float64)


def _dump(path, obj) -> None:
    pathlib.Path(path).write_text(json.dumps(obj, indent=2) + "\n")


@dataclasses.dataclass
class Served:
    """The decision export.py serves (W/eval/thresholds.json) and where it came from."""

    thresholds: dict  # the thresholds.json dict (evaluation.thresholds.record)
    origin: str  # one sentence for metrics.json, the report and the model card
    val: Predictions | None = None  # the validation predictions it was tuned on, if computed


def tune_on_val(model, data_dir: str, config: dict, info: dict, tta: bool,
                per_class_temperature: bool) -> Served:
    """Temperature fitted and rule tuned on the validation split of `data_dir`."""
    task, head, names = config["task"], config["head"], info["class_names"]
    val = predict_split(model, data_dir, "val", config, info, tta)
    temperature = calibration.fit_temperature(val.logits, val.labels, head,
                                              per_class_temperature)
    rule = thresholds.tune_rule(task, val.labels, _probs(val.logits, temperature, head), names)
    thr = thresholds.record(task, head, names, temperature, rule, tta, data_dir)
    return Served(thr, f"tuned on the validation split of {data_dir}", val)


def served_decision(workdir: pathlib.Path, model, own_data_dir: str, config: dict, info: dict,
                    tta: bool | None, per_class_temperature: bool) -> Served:
    """What export.py serves for W: its thresholds.json; tuned now (and written) when absent.

    `tta` None takes the served setting; a different explicit value is an error, since the
    served rule was tuned for the other logits.
    """
    path = workdir / "eval" / thresholds.THRESHOLDS_JSON
    if not path.is_file():
        served = tune_on_val(model, own_data_dir, config, info, bool(tta),
                             per_class_temperature)
        path.parent.mkdir(parents=True, exist_ok=True)
        _dump(path, served.thresholds)
        served.origin += f"; written to {path}, which export.py serves"
        return served
    rule, temperature, served_tta = thresholds.read_decision(path, config["task"],
                                                             info["num_classes"])
    if tta is not None and bool(tta) != served_tta:
        raise ValueError(f"{path} was tuned with tta={served_tta} and the exported model "
                         f"serves that; drop --tta/--notta, or re-run evaluate.py on W's own "
                         f"data with tta={bool(tta)} first")
    thr = {**json.loads(path.read_text()), "decision": rule, "temperature": temperature,
           "tta": served_tta}
    tuned = f"tuned on the {thr.get('tuned_on', 'val')} split of {thr.get('data_dir', 'W')}"
    return Served(thr, f"read from {path} ({tuned}), the decision export.py serves")


def check_compatible(info: dict, data_dir: str, image_size: int) -> dict:
    """dataset.json of an external `data_dir`, if the model can be evaluated on it as served.

    Task and class names must equal the model's (W/dataset.json), and the pre-processing
    recorded by prepare must be what the served graph applies (crop, CLAHE, Ben Graham,
    prepared size); otherwise ValueError naming the differences.
    """
    from input_pipeline import preprocessing

    path = pathlib.Path(data_dir) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; --data_dir must be a prepare.py output")
    other = json.loads(path.read_text())
    if other.get("task") != info["task"]:
        raise ValueError(f"{path}: task {other.get('task')!r}, the model's is {info['task']!r}")
    names, theirs = list(info["class_names"]), list(other.get("class_names") or [])
    if theirs != names:
        raise ValueError(f"{path}: {len(theirs)} classes {theirs}, the model has {len(names)} "
                         f"{names}; prepare the external set with the model's classes")
    mine = preprocessing.PreprocessConfig.from_dataset_info(info, image_size).to_json()
    yours = preprocessing.PreprocessConfig.from_dataset_info(other, image_size).to_json()
    diff = {k: (mine[k], yours.get(k)) for k in mine if mine[k] != yours.get(k)}
    if diff:
        shown = ", ".join(f"{k}: model {a!r} vs {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{path}: prepared differently from the model's training data "
                         f"({shown}); the served model applies the training settings, so "
                         "prepare the external set with them")
    return other


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def evaluate(workdir: str, split: str = "test", data_dir: str | None = None,
             tta: bool | None = None, n_boot: int = 1000, per_class_temperature: bool = False,
             gradcam_per_kind: int = 4, seed: int = 0) -> pathlib.Path:
    """Runs the whole evaluation of a training workdir; returns the report path.

    On W's own data (no `data_dir`, or the training one): tunes temperature and rule on its
    val split, writes W/eval/ (thresholds.json included). On another prepared data dir
    (external validation): the decision is the served one (`served_decision`), nothing is
    tuned on the external set, and everything goes to W/eval/external/<name of data_dir>/.
    """
    from training import experiment

    workdir = pathlib.Path(workdir)
    model, info, config = experiment.build_from_config(str(workdir))
    task, head, names = config["task"], config["head"], info["class_names"]
    # Absolute, as recorded in thresholds.json and the report.
    own_dir = os.path.abspath(experiment.resolve_data_dir(str(workdir), config["data_dir"]))
    external = data_dir is not None and not _same_dir(data_dir, own_dir)
    if external:
        check_compatible(info, data_dir, config["image_size"])
        served = served_decision(workdir, model, own_dir, config, info, tta,
                                 per_class_temperature)
        name = pathlib.Path(os.path.realpath(data_dir)).name
        eval_dir, data_dir = workdir / "eval" / "external" / name, os.path.abspath(data_dir)
    else:
        served = tune_on_val(model, own_dir, config, info, bool(tta), per_class_temperature)
        eval_dir, data_dir = workdir / "eval", own_dir
    eval_dir.mkdir(parents=True, exist_ok=True)
    thr = served.thresholds
    tta, temperature, rule = thr["tta"], thr["temperature"], thr["decision"]

    val = served.val
    test = val if split == "val" and not external else predict_split(
        model, data_dir, split, config, info, tta)
    cal = calibration.calibrate(val.logits if val else None, val.labels if val else None, head,
                                test.logits, test.labels, per_class_temperature, temperature)
    out = decision.decide(test.logits, head, rule, temperature)
    probs, decisions = np.asarray(out["probabilities"], np.float64), out["decision"]

    result = metrics.compute_metrics(task, test.labels, probs, decisions, names,
                                     test.patient_ids, n_boot=n_boot, seed=seed)
    result.update(split=split, data_dir=data_dir, external=external, tta=tta,
                  workdir=str(workdir), decision_origin=served.origin,
                  tuned_on_evaluated_data=split == "val" and not external,
                  calibration={k: cal[k] for k in ("temperature", "nll", "ece")})
    _dump(eval_dir / "metrics.json", result)
    _dump(eval_dir / thresholds.THRESHOLDS_JSON, thr)
    _dump(eval_dir / "calibration.json", cal)
    write_predictions_csv(eval_dir / f"predictions_{split}.csv", task, names, test, probs,
                          decisions)
    items = gradcam_gallery(model, task, head, data_dir, split, config, info, test, probs,
                            decisions, eval_dir, gradcam_per_kind)
    curves = metrics.compute_curves(task, test.labels, probs, names)
    path = report.write_report(eval_dir, result, thr, cal, curves, items)
    report.log_to_tensorboard(workdir / "tensorboard" / ("eval_external" if external
                                                         else "eval"),
                              report.report_pngs(eval_dir))
    return path

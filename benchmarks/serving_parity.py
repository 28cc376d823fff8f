"""Served = evaluated: the exported SavedModel on the raw image files of a split vs evaluate.py.

    python -m benchmarks.serving_parity [--workdir=demo_run] [--model=demo_run/export/1] \\
        [--split=test]

W is a training workdir on which `evaluate.py --split=S` ran (W/eval/predictions_S.csv)
and E/N its export (`export.py`); the defaults are what `make demo` leaves. Every row
of predictions_S.csv names its raw file (`source`, relative to dataset.json's
`source.images_dir`); the file is sent as bytes to `serving_default` (what a TF
Serving client does) and the answer compared with evaluate's row: the decision, max
|probability difference| over the classes, and the field circle with the one prepare
finds (`preprocessing.process_image`, which wrote the training pixels). Then what
skipping prepare's JPEG round trip would change. tests/test_serving_parity.py asserts
the parity on a small synthetic run.

On the Mexican fundus set (research data, ../shared/data/mexico_fundus), 2 CPU cores:

    M=../shared/data/mexico_fundus
    python -m input_pipeline.prepare --source=mexico --labels_csv=$M/labels.csv \\
      --images_dir=$M --out_dir=/tmp/mx --task=binary --label_column=dme \\
      --image_size=128 --duplicates_csv=$M/duplicates.csv
    python train.py --gin_file=configs/demo.gin --gin_bindings="train.data_dir='/tmp/mx'" \\
      --gin_bindings="train.head='sigmoid'" --gin_bindings="train.monitor='val_auc'" \\
      --gin_bindings="train.epochs=4" --workdir=/tmp/mx_run
    python evaluate.py --workdir=/tmp/mx_run --split=test
    python export.py --workdir=/tmp/mx_run --export_dir=/tmp/mx_run/export --version=1
    python -m benchmarks.serving_parity --workdir=/tmp/mx_run --model=/tmp/mx_run/export/1
"""

import json
import pathlib

import numpy as np
import pandas as pd
import tensorflow as tf
from absl import app, flags

from input_pipeline import preprocessing

FLAGS = flags.FLAGS


def _served(model_dir: pathlib.Path, paths: list[pathlib.Path], batch: int = 16) -> dict:
    """serving_default's outputs (numpy, concatenated) on the files' bytes."""
    signature = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    parts = []
    for start in range(0, len(paths), batch):
        data = [preprocessing.graph_bytes(p.read_bytes())[0] for p in paths[start:start + batch]]
        parts.append({k: v.numpy() for k, v in signature(image_bytes=tf.constant(data)).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def compare(workdir, model_dir, split: str = "test", circles: bool = True) -> dict:
    """Figures of served vs evaluated predictions, image by image.

    Returns:
        {"images", "decisions_equal", "decision_agreement", "max_prob_diff",
         "prob_diff_below_0.01" (share of images), "ok", "gradable" (counts),
         "max_circle_diff" (px, original pixels; None without circles),
         "differences": [(source, evaluated, served, max prob diff), ...]}.
    """
    workdir, model_dir = pathlib.Path(workdir), pathlib.Path(model_dir)
    rows = pd.read_csv(workdir / "eval" / f"predictions_{split}.csv", keep_default_na=False)
    info = json.loads((workdir / "dataset.json").read_text())
    meta = json.loads((model_dir / "fundusflow.json").read_text())
    images_dir = pathlib.Path(info["source"]["images_dir"])
    paths = [images_dir / s for s in rows["source"]]
    out = _served(model_dir, paths)
    names = meta["class_names"]
    want_p = rows[[f"p_{n}" for n in names]].to_numpy(np.float64)
    diff = np.abs(out["probabilities"] - want_p).max(axis=1)
    if meta["decision_output"] == "labels":
        want_d = rows[[f"pred_{n}" for n in names]].to_numpy(np.int64)
        same = (out["labels"] == want_d).all(axis=1)
    else:
        want_d = rows["prediction"].to_numpy(np.int64)
        same = out[meta["decision_output"]] == want_d
    result = {"images": len(rows), "decisions_equal": int(same.sum()),
              "decision_agreement": float(same.mean()), "max_prob_diff": float(diff.max()),
              "prob_diff_below_0.01": float((diff < 0.01).mean()),
              "ok": int(out["ok"].sum()), "gradable": int(out["gradable"].sum()),
              "max_circle_diff": None,
              "differences": [(rows["source"][i], int(np.asarray(want_d[i]).sum()),
                               int(np.asarray(out[meta["decision_output"]][i]).sum()),
                               float(diff[i])) for i in np.flatnonzero(~same)]}
    if circles and info.get("preprocessing", {}).get("crop", "fundus") == "fundus":
        config = preprocessing.PreprocessConfig.from_dataset_info(info)
        prepared = np.array([preprocessing.process_image(p, config)[1]["circle"]
                             for p in paths])
        result["max_circle_diff"] = float(np.abs(out["field_circle"] - prepared).max())
    return result


def round_trip_effect(workdir, split: str = "test") -> dict:
    """What prepare's stored JPEG (quality jpeg_quality) changes, on the split's raw files.

    The served graph repeats the JPEG round trip so that it sees the training pixels;
    this measures what skipping it would change: model pixels (mean and max |diff| in
    grey levels at the model's size), probabilities and decisions of the workdir's model.
    """
    import dataclasses

    from serving import exporting

    workdir = pathlib.Path(workdir)
    rows = pd.read_csv(workdir / "eval" / f"predictions_{split}.csv", keep_default_na=False)
    info = json.loads((workdir / "dataset.json").read_text())
    model, spec, _ = exporting.load_workdir(workdir)
    serve = exporting.tensor_fn(model, spec)
    raw = dataclasses.replace(spec.preprocess, jpeg_quality=0)
    pixels = {"jpeg": [], "raw": []}
    for source in rows["source"]:
        data = preprocessing.graph_bytes(
            (pathlib.Path(info["source"]["images_dir"]) / source).read_bytes())[0]
        image = preprocessing.process_fn(spec.preprocess)(tf.constant(data))["image"]
        pixels["jpeg"].append(preprocessing.model_pixels(image, spec.preprocess).numpy())
        pixels["raw"].append(preprocessing.model_pixels(image, raw).numpy())
    x = {k: np.stack(v) for k, v in pixels.items()}
    out = {k: {n: np.asarray(t) for n, t in serve(v).items()} for k, v in x.items()}
    diff = np.abs(x["jpeg"] - x["raw"])
    dp = np.abs(out["jpeg"]["probabilities"] - out["raw"]["probabilities"]).max(axis=1)
    same = out["jpeg"][spec.decision_name] == out["raw"][spec.decision_name]
    if same.ndim > 1:
        same = same.all(axis=1)
    return {"images": len(rows), "jpeg_quality": spec.preprocess.jpeg_quality,
            "pixel_mean_abs_diff": float(diff.mean()), "pixel_max_abs_diff": float(diff.max()),
            "max_prob_diff": float(dp.max()), "median_prob_diff": float(np.median(dp)),
            "prob_diff_below_0.01": float((dp < 0.01).mean()),
            "decisions_changed": int((~same).sum())}


def main(argv) -> None:
    del argv
    for path in (pathlib.Path(FLAGS.workdir) / "eval" / f"predictions_{FLAGS.split}.csv",
                 pathlib.Path(FLAGS.model) / "saved_model.pb"):
        if not path.is_file():
            raise app.UsageError(f"{path} not found: run `make demo` first, or pass --workdir "
                                 "(evaluated) and --model (its export)")
    r = compare(FLAGS.workdir, FLAGS.model, FLAGS.split)
    print(f"served ({FLAGS.model}) vs evaluate.py (predictions_{FLAGS.split}.csv) on "
          f"{r['images']} raw images: decisions equal {r['decisions_equal']}/{r['images']} "
          f"= {r['decision_agreement']:.2%}; |prob diff| < 0.01 on "
          f"{r['prob_diff_below_0.01']:.2%}, max {r['max_prob_diff']:.2e}; ok {r['ok']}, "
          f"gradable {r['gradable']}; max field-circle difference vs prepare "
          f"{r['max_circle_diff']} px")
    for source, want, got, d in r["differences"]:
        print(f"  differs: {source}: evaluated {want}, served {got}, max |dp| {d:.3g}")
    e = round_trip_effect(FLAGS.workdir, FLAGS.split)
    print(f"without prepare's JPEG round trip (quality {e['jpeg_quality']}) the served pixels "
          f"would differ by {e['pixel_mean_abs_diff']:.3f} grey levels on average (max "
          f"{e['pixel_max_abs_diff']:.1f}); probabilities by max {e['max_prob_diff']:.3g} "
          f"(median {e['median_prob_diff']:.2g}, < 0.01 on {e['prob_diff_below_0.01']:.1%}); "
          f"decisions changed on {e['decisions_changed']}/{e['images']} images")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", "demo_run", "Training workdir with "
                        "eval/predictions_<split>.csv.")
    flags.DEFINE_string("model", "demo_run/export/1", "Exported version directory (E/N).")
    flags.DEFINE_string("split", "test", "Split evaluate.py was run on.")
    app.run(main)

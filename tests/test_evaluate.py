"""evaluate.py end to end on a tiny workdir trained for 1 epoch on 32 px shards."""

import csv
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from evaluation import run
from tests.test_train import DEBUG_GIN, REPO, write_shards


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from training import experiment

    data_dir = write_shards(str(tmp_path_factory.mktemp("data")),
                            counts={"train": 40, "val": 30, "test": 30})
    w = tmp_path_factory.mktemp("run") / "w"
    gin.clear_config()
    gin.parse_config_files_and_bindings([DEBUG_GIN], [f"train.data_dir = '{data_dir}'",
                                                      "train.epochs = 1"])
    experiment.train(str(w))
    gin.clear_config()
    return w


@pytest.fixture(scope="module")
def evaluated(workdir):
    out = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"),
                          f"--workdir={workdir}", "--tta", "--n_boot=50",
                          "--gradcam_per_kind=2"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir / "eval", out.stdout


def test_files_and_report_location(evaluated):
    eval_dir, stdout = evaluated
    assert f"Report: {eval_dir / 'report.html'}" in stdout
    for name in ("metrics.json", "thresholds.json", "calibration.json", "report.html",
                 "predictions_test.csv", "roc.png", "reliability.png", "confusion_matrix.png"):
        assert (eval_dir / name).is_file(), name
    assert len(list((eval_dir / "gradcam").glob("*.png"))) >= 2
    assert list((eval_dir.parent / "tensorboard" / "eval").glob("events.out.tfevents.*"))


def test_metrics_json_keys(evaluated):
    m = json.loads((evaluated[0] / "metrics.json").read_text())
    assert m["task"] == "dr_grade" and m["split"] == "test" and m["tta"] is True
    assert m["num_examples"] == 30
    for key in ("qwk", "accuracy", "weighted_f1", "referable_auc", "referable_sensitivity",
                "referable_specificity"):
        assert key in m["metrics"]
    assert set(m["confidence_intervals"]) == set(m["headline"])
    assert np.array(m["confusion_matrix"]).sum() == 30
    assert m["calibration"]["temperature"] > 0


def test_thresholds_json_is_an_applicable_rule(evaluated):
    t = json.loads((evaluated[0] / "thresholds.json").read_text())
    assert t["task"] == "dr_grade" and t["head"] == "coral" and t["tuned_on"] == "val"
    cuts = t["decision"]["cutpoints"]
    assert t["decision"]["type"] == "ordinal_cutpoints" and len(cuts) == 4
    assert all(a < b for a, b in zip(cuts, cuts[1:], strict=False))


def test_predictions_csv_matches_metrics(evaluated):
    with open(evaluated[0] / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    m = json.loads((evaluated[0] / "metrics.json").read_text())
    assert len(rows) == 30 and {"source", "label", "prediction", "p_0", "p_4"} <= set(rows[0])
    acc = np.mean([r["label"] == r["prediction"] for r in rows])
    assert acc == pytest.approx(m["metrics"]["accuracy"])


def test_gallery_indices():
    correct = np.array([True, False, True, True, False])
    idx = run.gallery_indices(correct, per_kind=2)
    assert sorted(correct[idx].tolist()) == [False, False, True, True]
    assert len(run.gallery_indices(np.array([True]), per_kind=3)) == 1


# ------------------------------------------------- other tasks (untrained model, no training)

def _write_split(out_dir, split, labels, rng):
    import cv2
    import tensorflow as tf

    from input_pipeline import features

    name = f"{split}-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(os.path.join(out_dir, name)) as w:
        for i, y in enumerate(labels):
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            png = cv2.imencode(".png", img)[1].tobytes()
            label = [int(v) for v in y] if np.ndim(y) else int(y)
            w.write(features.serialize_example(png, label, height=32, width=32,
                                               patient_id=f"p{i // 2}", source=f"{split}{i}.png"))


@pytest.mark.parametrize("task,k,head,rule_type", [
    ("multilabel", 3, "sigmoid", "per_class_thresholds"),
    ("binary", 2, "sigmoid", "binary_threshold"),
    ("multiclass", 3, "softmax", "argmax"),
])
def test_other_tasks_in_process(tmp_path, monkeypatch, task, k, head, rule_type):
    from models.registry import build_model
    from training import experiment

    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        labels = (rng.random((16, k)) < 0.5).astype(int) if task == "multilabel" \
            else np.arange(16) % k
        _write_split(str(tmp_path), split, labels, rng)
    names = [f"c{i}" for i in range(k)]
    info = {"task": task, "num_classes": k, "class_names": names}
    config = {"task": task, "head": head, "data_dir": str(tmp_path), "batch_size": 8,
              "image_size": 32}
    model = build_model("resnetv2_lite", task, k, 32, widths=(8,))
    monkeypatch.setattr(experiment, "build_from_config", lambda w: (model, info, config))

    path = run.evaluate(str(tmp_path / "w"), n_boot=10, gradcam_per_kind=1)
    eval_dir = tmp_path / "w" / "eval"
    assert path == eval_dir / "report.html" and path.is_file()
    m = json.loads((eval_dir / "metrics.json").read_text())
    assert m["task"] == task and m["num_examples"] == 16 and m["num_patients"] == 8
    assert set(m["confidence_intervals"]) == set(m["headline"])
    assert json.loads((eval_dir / "thresholds.json").read_text())["decision"]["type"] == rule_type
    with open(eval_dir / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and rows[3]["patient_id"] == "p1"
    assert ("pred_c2" in rows[0]) == (task == "multilabel")

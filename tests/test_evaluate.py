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

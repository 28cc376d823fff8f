"""The real-data configs (README "Results on real data"): they parse, monitor a metric
their task has, and the RetinaMNIST one trains and evaluates on a subset of the real file.

The smoke run reads ../shared/data/retinamnist/retinamnist.npz and skips without it.
"""

import json
import os

import cv2
import gin
import numpy as np
import pytest

from evaluation import run as eval_run
from evaluation import summary
from models import metrics as model_metrics
from tests.test_train import REPO

# config -> (task, num_classes) of the data its Makefile target prepares.
REAL_CONFIGS = {
    "retinamnist_resnetv2_lite": ("dr_grade", 5),
    "mexico_fundus_dme": ("binary", 2),
    "mexico_fundus_dr": ("dr_grade", 3),
    "mexico_oct_dme": ("binary", 2),
}


def _parse(name: str, bindings=()) -> dict:
    from training import experiment

    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(REPO, "configs", f"{name}.gin")],
                                        list(bindings))
    return experiment.resolved_train_config()


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_config_parses_and_monitors_a_metric_of_its_task(name):
    task, k = REAL_CONFIGS[name]
    config = _parse(name)
    try:
        head = config["head"]
        names = {m.name for m in model_metrics.get_metrics(task, k, head)} | {"loss"}
        assert config["monitor"] in {f"val_{n}" for n in names}, config["monitor"]
        assert config["weights"] is None  # the reported runs train from scratch
        assert config["jit_compile"] is False
    finally:
        gin.clear_config()


def _subset_npz(src: str, dst: str, n: dict) -> None:
    """The first n[split] images of each official split of a MedMNIST npz."""
    with np.load(src) as d:
        arrays = {f"{s}_{kind}": d[f"{s}_{kind}"][:n[s]]
                  for s in n for kind in ("images", "labels")}
    np.savez(dst, **arrays)


def test_retinamnist_config_smoke_run(shared_data, tmp_path):
    """1 epoch of the real config on 96/40/40 RetinaMNIST images, then evaluate."""
    from input_pipeline import prepare
    from training import experiment

    npz = tmp_path / "retina_subset.npz"
    _subset_npz(str(shared_data / "retinamnist" / "retinamnist.npz"), str(npz),
                {"train": 96, "val": 40, "test": 40})
    data = tmp_path / "data"
    info = prepare.run(prepare.PrepareConfig(
        labels_csv=str(npz), out_dir=str(data), source="npz", task="dr_grade",
        split_column="split", crop="none", image_size=28, num_shards=3))
    assert [info["splits"][s]["num_examples"] for s in ("train", "val", "test")] == [96, 40, 40]

    workdir = tmp_path / "run"
    _parse("retinamnist_resnetv2_lite", [f"train.data_dir = '{data}'", "train.epochs = 1",
                                         "train.verbose = 0"])
    try:
        experiment.train(str(workdir))
    finally:
        gin.clear_config()
    eval_run.evaluate(str(workdir), "test", n_boot=20, gradcam_per_kind=1)
    m = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert m["num_examples"] == 40 and m["task"] == "dr_grade"
    for name in ("qwk", "accuracy", "argmax_accuracy", "macro_auc"):
        assert name in m["headline"]
    assert 0.0 <= m["metrics"]["macro_auc"] <= 1.0
    line = summary.summary_line(str(workdir))
    assert "test n=40" in line and "macro_auc" in line and "(1 epochs" in line


def _write_images(folder, brightness, rng) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    names = []
    for i, b in enumerate(brightness):
        img = np.clip(rng.normal(b, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        names.append(f"img{i}.png")
        cv2.imwrite(os.path.join(folder, names[-1]), img)
    return names


def test_shortcut_check_finds_a_brightness_label_and_skips_unknown(tmp_path):
    from evaluation import shortcut

    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    names = _write_images(tmp_path / "images", 60 + 80 * y, rng)
    rows = [f"images/{n},p{i // 2},{'yes' if v else 'no'}" for i, (n, v) in
            enumerate(zip(names, y, strict=True))]
    rows += ["images/img0.png,p99,"]  # unknown label: skipped, counted
    csv = tmp_path / "labels.csv"
    csv.write_text("image,patient_id,grade\n" + "\n".join(rows) + "\n")
    r = shortcut.run(str(csv), str(tmp_path), "grade", positive=("YES",))
    assert r == {"auc": pytest.approx(1.0), "n": 40, "positives": 20, "skipped_unknown": 1}
    # The same images with labels unrelated to brightness: no shortcut.
    shuffled = np.array([0, 1, 1, 0] * 10)  # 2 bright, 2 dark per label value
    assert shortcut.shortcut_auc(
        np.stack([shortcut.colour_stats(str(tmp_path / "images" / n)) for n in names]),
        shuffled, [f"p{i // 4}" for i in range(40)]) < 0.8

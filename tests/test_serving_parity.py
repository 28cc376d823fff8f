"""Served = evaluated: the exported model on raw files agrees with evaluate.py image by image.

The whole flow on a small demo-like run: synthetic photographs -> prepare (fundus crop,
64 px) -> train (debug config, 32 px) -> evaluate.py -> export.py -> the SavedModel's
`serving_default` on the raw files of the test split (benchmarks.serving_parity).
"""

import gin
import pytest

from benchmarks import serving_parity
from evaluation import run as evaluation_run
from input_pipeline import prepare, synthetic
from serving import exporting
from tests.test_train import DEBUG_GIN


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from training import experiment

    root = tmp_path_factory.mktemp("parity")
    synthetic.generate(root / "raw", num_images=80, image_size=256, seed=0)
    prepare.run(prepare.PrepareConfig(
        labels_csv=str(root / "raw" / "labels.csv"), images_dir=str(root / "raw"),
        out_dir=str(root / "prepared"), task="dr_grade", label_columns=("dr_grade",),
        image_size=64, split="0.5,0.25,0.25", workers=2))
    workdir = root / "run"
    gin.clear_config()
    gin.parse_config_files_and_bindings([DEBUG_GIN], [
        f"train.data_dir = '{root / 'prepared'}'", "train.epochs = 1"])
    experiment.train(str(workdir))
    gin.clear_config()
    # What evaluate.py and export.py do, in-process (their mains only parse flags).
    evaluation_run.evaluate(str(workdir), "test", n_boot=10, gradcam_per_kind=0)
    exporting.export_workdir(workdir, workdir / "export", version=1)
    return workdir


def test_served_model_on_raw_files_equals_evaluate(run):
    r = serving_parity.compare(run, run / "export" / "1", "test")
    assert r["images"] >= 15 and r["ok"] == r["images"]
    assert r["decisions_equal"] == r["images"], r["differences"]
    assert r["max_prob_diff"] < 1e-4  # same pixels by construction: float noise only
    assert r["max_circle_diff"] <= 0.051  # same detection; prepare rounds circles to 0.1 px
    assert r["gradable"] == r["images"]  # every demo-like photograph is gradable

"""The five reference systems' one-command chains (`make reproduce-<system>`), run with
their `_debug` configs on synthetic data laid out like each real source
(input_pipeline/synthetic_layouts.py): prepare, (IDRiD: grid search,) train, evaluate,
export. Every config and its debug variant also parse, and set what the system chose.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import gin
import pytest

from input_pipeline import synthetic_layouts

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("dr_grading_convnext_tiny_ordinal", "rfmid_multilabel_convnext_tiny",
           "ocunet_efficientnet_b3_asl", "oct_mobilenetv3_large", "idrid_binary_resnetv2_lite")
# system -> (make target, {make variable: layout written there}, extra make variables)
SYSTEMS = {
    "dr_grading": ("reproduce-dr-grading", {"DATA": "eyepacs"}, {}),
    "rfmid": ("reproduce-rfmid", {"DATA": "rfmid"}, {"MIN_CLASS_COUNT": "3"}),
    "ocunet": ("reproduce-ocunet", {"RFMID": "rfmid", "ODIR": "odir"}, {"MIN_CLASS_COUNT": "2"}),
    "oct": ("reproduce-oct", {"DATA": "kermany"}, {}),
    "idrid": ("reproduce-idrid", {"DATA": "idrid"},
              {"IDRID_GRID": "--grid=train.learning_rate=1e-2,1e-3 --grid=train.batch_size=4"}),
}
# Where each layout's root is, relative to the folder write_layout wrote.
LAYOUT_ROOT = {"eyepacs": "", "rfmid": "", "odir": "ODIR-5K", "kermany": "OCT2017", "idrid": ""}
NUM_IMAGES, RAW_SIZE = 48, 64


def _has_tf2onnx() -> bool:
    import importlib.util

    return importlib.util.find_spec("tf2onnx") is not None


def _run_chain(system: str, tmp: pathlib.Path) -> pathlib.Path:
    target, layouts, extra = SYSTEMS[system]
    variables = dict(extra)
    for var, layout in layouts.items():
        synthetic_layouts.write_layout(layout, tmp / layout, NUM_IMAGES, RAW_SIZE, seed=1)
        variables[var] = str(tmp / layout / LAYOUT_ROOT[layout])
    out = tmp / "out"
    variables.update(OUT=str(out), SUFFIX="_debug", PY=sys.executable, REPRO_DEPS="",
                     PREPARE_FLAGS="--workers=1 --image_size=40",
                     EVAL_FLAGS="--n_boot=10 --gradcam_per_kind=1",
                     ONNX="1" if _has_tf2onnx() else "")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([shutil.which("make") or "make", "-C", str(REPO), target,
                           *(f"{k}={v}" for k, v in variables.items())],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out / system


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_debug_chain(system, tmp_path):
    root = _run_chain(system, tmp_path)
    summary = json.loads((root / "run" / "training_summary.json").read_text())
    assert summary["epochs_run"] >= 1 and summary["best_epoch"] is not None
    assert (root / "run" / "eval" / "metrics.json").exists()
    assert (root / "run" / "eval" / "thresholds.json").exists()
    assert (root / "export" / "1" / "saved_model.pb").exists()
    card = json.loads((root / "export" / "1" / "fundusflow.json").read_text())
    info = json.loads((root / "prepared" / "dataset.json").read_text())
    assert card and info["task"] == summary["task"]
    if system == "idrid":
        rows = (root / "tune" / "results.csv").read_text().splitlines()
        assert len(rows) == 3 and rows[0].startswith("trial,train.learning_rate")
        best = (root / "tune" / "best.gin").read_text()
        assert "train.learning_rate = " in best and "train.batch_size = 4" in best
    if system == "oct":
        assert info["modality"] == "oct" and info["num_classes"] == 4
    if system == "ocunet":
        assert info["class_names"][0] == "Disease_Risk" and "NORMAL" in info["class_names"]


def _bindings(config: str) -> dict:
    gin.clear_config()
    cwd = os.getcwd()
    os.chdir(REPO)  # includes are relative to the repository root
    try:
        from training import experiment

        gin.parse_config_files_and_bindings([f"configs/{config}.gin"], [])
        return experiment.resolved_train_config()
    finally:
        os.chdir(cwd)
        gin.clear_config()


@pytest.mark.parametrize("config", CONFIGS)
def test_configs_and_debug_variants_parse(config):
    main, debug = _bindings(config), _bindings(config + "_debug")
    assert main["monitor"] and main["epochs"] >= 20 and main["image_size"] >= 224
    assert debug["epochs"] <= 2 and debug["image_size"] <= 32 and debug["weights"] is None
    for key in ("model", "head", "loss", "monitor", "learning_rate"):
        assert debug[key] == main[key], key  # the debug variant only shrinks


def test_configs_set_the_systems_choices():
    rfmid = _bindings("rfmid_multilabel_convnext_tiny")
    assert (rfmid["loss"], rfmid["loss_kwargs"]) == ("focal", {"gamma": 2.5, "alpha": 0.15})
    assert rfmid["backbone_lr_factor"] == pytest.approx(1 / 15, rel=1e-5)
    assert (rfmid["head_lr_factor"], rfmid["monitor"]) == (0.8, "val_tuned_macro_f1")
    assert rfmid["learning_rate"] * rfmid["min_lr_ratio"] == pytest.approx(1e-7)
    ocunet = _bindings("ocunet_efficientnet_b3_asl")
    assert (ocunet["loss"], ocunet["use_ema"], ocunet["warmup_epochs"]) == ("asl", True, 5.0)
    oct_ = _bindings("oct_mobilenetv3_large")
    assert oct_["learning_rate"] * oct_["finetune_lr_factor"] == pytest.approx(1e-5)
    assert (oct_["freeze_backbone_epochs"], oct_["class_weight"]) == (10, "balanced")
    idrid = _bindings("idrid_binary_resnetv2_lite")
    assert (idrid["head"], idrid["epochs"], idrid["checkpoint_every_epochs"]) == (
        "softmax", 300, 5)
    dr = _bindings("dr_grading_convnext_tiny_ordinal")
    assert (dr["head"], dr["image_size"], dr["monitor"]) == ("coral", 224, "val_qwk")

"""tune.py's sweep: grid parsing, combination order, ranking and the files it writes."""

import csv
import os

import gin
import pytest

from tests.test_train import write_shards
from training import tuning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_grid_and_combinations():
    grid = tuning.parse_grid(["train.learning_rate=1e-2, 1e-3", "train.batch_size=2,4"])
    assert grid == {"train.learning_rate": ["1e-2", "1e-3"], "train.batch_size": ["2", "4"]}
    assert tuning.combinations(grid) == [
        {"train.learning_rate": "1e-2", "train.batch_size": "2"},
        {"train.learning_rate": "1e-2", "train.batch_size": "4"},
        {"train.learning_rate": "1e-3", "train.batch_size": "2"},
        {"train.learning_rate": "1e-3", "train.batch_size": "4"}]
    for bad in (["train.lr"], ["=1,2"], ["a.b="], []):
        with pytest.raises(ValueError, match="--grid"):
            tuning.parse_grid(bad)
    with pytest.raises(ValueError, match="given twice"):
        tuning.parse_grid(["a.b=1", "a.b=2"])


def test_rank_by_mode_and_failed_trials_last():
    rows = [{"status": "ok", "best_metric": 0.5, "mode": "max"},
            {"status": "error: x", "best_metric": None, "mode": None},
            {"status": "ok", "best_metric": 0.9, "mode": "max"},
            {"status": "nan", "best_metric": 0.99, "mode": "max"}]
    assert [r["best_metric"] for r in sorted(rows, key=tuning._rank_key)][:2] == [0.9, 0.5]
    losses = [{"status": "ok", "best_metric": v, "mode": "min"} for v in (0.3, 0.1)]
    assert sorted(losses, key=tuning._rank_key)[0]["best_metric"] == 0.1


def test_sweep_writes_table_and_best_gin(tmp_path):
    data = write_shards(str(tmp_path / "data"))
    rows = tuning.sweep([os.path.join(REPO, "configs", "debug.gin")],
                        [f"train.data_dir = '{data}'", "train.epochs = 1"],
                        {"train.learning_rate": ["1e-2", "1e-9"]}, str(tmp_path / "tune"))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["best_metric"] >= rows[1]["best_metric"]
    with open(tmp_path / "tune" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in table] == [r["trial"] for r in rows]
    best = (tmp_path / "tune" / "best.gin").read_text()
    assert f"train.learning_rate = {rows[0]['train.learning_rate']}" in best
    assert (tmp_path / "tune" / "results.md").read_text().startswith("| trial |")
    # best.gin applies after the base config.
    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(REPO, "configs", "debug.gin"),
                                         str(tmp_path / "tune" / "best.gin")], [])
    assert gin.query_parameter("train.learning_rate") == float(rows[0]["train.learning_rate"])
    gin.clear_config()

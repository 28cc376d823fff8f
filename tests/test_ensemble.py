"""evaluation/ensemble.py: mean probabilities, golden metrics, member checks.

The end-to-end parity (an ensemble of one workdir twice equals evaluate.py on it) runs in
tests/test_evaluate.py, on that file's trained workdir.
"""

import numpy as np
import pytest

from evaluation import ensemble, run
from models import decision

# Two members, 4 test images, grades 0-2; multiples of 1/8, so the means (and their ties)
# are exact in floating point.
M1 = np.array([[.625, .25, .125], [.25, .5, .25], [.125, .25, .625], [.5, .375, .125]])
M2 = np.array([[.375, .5, .125], [.375, .25, .375], [.25, .125, .625], [.125, .625, .25]])
Y = np.array([0, 1, 2, 0])


def test_combine_golden_values():
    result, mean = ensemble.combine("dr_grade", ["0", "1", "2"], Y, [M1, M2], Y, [M1, M2],
                                    n_boot=0)
    np.testing.assert_array_equal(mean, [[.5, .375, .125], [.3125, .375, .3125],
                                         [.1875, .1875, .625], [.3125, .5, .1875]])
    m = result["metrics"]
    # argmax of the mean: 0, 1, 2, 1 -> 3 of 4 (member 1 alone: 4 of 4, member 2: 1 of 4).
    assert m["argmax_accuracy"] == pytest.approx(3 / 4)
    # One-vs-rest AUCs of the mean: grade 0 scores .5, .3125 (pos) vs .3125, .1875: 3.5 / 4
    # pairs (one tie); grade 1 .375 (pos) vs .375, .1875, .5: 1.5 / 3; grade 2: .625 (pos)
    # above all: 1.
    assert m["macro_auc"] == pytest.approx((0.875 + 0.5 + 1.0) / 3)
    # The tuned ordinal rule decides; its accuracy is that of the rule on the mean.
    assert result["decision"]["type"] == "ordinal_cutpoints"
    decided = decision.apply_rule(result["decision"], mean)
    assert m["accuracy"] == pytest.approx(np.mean(decided == Y))
    assert result["confidence_intervals"] == {}


def test_combine_with_bootstrap_intervals_contains_the_value():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    members = [np.eye(3)[y] * 0.5 + rng.dirichlet(np.ones(3), 60) * 0.5 for _ in range(3)]
    result, _ = ensemble.combine("dr_grade", ["0", "1", "2"], y, members, y, members,
                                 n_boot=200)
    ci = result["confidence_intervals"]["macro_auc"]
    assert ci["low"] <= result["metrics"]["macro_auc"] <= ci["high"]
    assert "argmax_accuracy" in result["confidence_intervals"]


def _member(workdir, labels, class_names=("0", "1", "2")):
    pred = run.Predictions(np.zeros((len(labels), 3), np.float32), np.asarray(labels),
                           np.array([""] * len(labels)), np.array(["s"] * len(labels)))
    return {"workdir": workdir, "task": "dr_grade", "class_names": list(class_names),
            "val": pred, "pred": pred}


def test_check_members_names_the_member_that_differs():
    ensemble.check_members([_member("a", [0, 1]), _member("b", [0, 1])])
    with pytest.raises(ValueError, match=r"^b: the labels of its val predictions"):
        ensemble.check_members([_member("a", [0, 1]), _member("b", [1, 0])])
    with pytest.raises(ValueError, match=r"^c: class_names"):
        ensemble.check_members([_member("a", [0, 1]), _member("c", [0, 1], ("x", "y", "z"))])


def test_needs_two_members(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        ensemble.ensemble([str(tmp_path)], str(tmp_path / "e"))

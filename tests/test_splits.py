"""Grouping (patient + identical bytes), stratified group splits, rare classes."""

import numpy as np
import pytest

from input_pipeline import splits


def test_union_find_roots_are_smallest_members():
    uf = splits.UnionFind(6)
    assert uf.union_all([4, 2, 5]) == 2
    assert uf.union(5, 2) is False  # already joined
    assert [uf.find(i) for i in range(6)] == [0, 1, 2, 3, 2, 2]


def test_groups_join_patients_and_identical_bytes(tmp_path):
    files = {"a.jpg": b"same-bytes", "b.jpg": b"same-bytes", "c.jpg": b"other-1",
             "d.jpg": b"other-2", "e.jpg": b"lonely-bytes!", "f.jpg": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / n) for n in files] + [str(tmp_path / "missing.jpg")]
    # a,b identical bytes (different patients); b,c same patient; d has the same size as c
    # but other bytes; e,f,missing have no patient (""), which must not join them.
    patients = ["p1", "p2", "p2", "p3", "", "", ""]
    groups, stats = splits.group_rows(patients, paths)
    assert groups.tolist() == [0, 0, 0, 3, 4, 5, 6]
    assert stats["identical_file_sets"] == 1  # empty files are never "duplicates"
    assert stats["groups_merged_by_identical_bytes"] == 1
    groups, stats = splits.group_rows(patients, paths, extra_groups=[[3, 4]])
    assert groups.tolist() == [0, 0, 0, 3, 3, 5, 6]
    assert stats["groups_merged_by_duplicates_csv"] == 1


def _grouped_dataset(seed=0, num_groups=400, num_classes=3):
    """Groups of 1-4 rows; a group's rows mostly share a class (like a patient's eyes)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, num_groups)
    group_class = rng.choice(num_classes, num_groups, p=[0.6, 0.3, 0.1][:num_classes])
    groups = np.repeat(np.arange(num_groups), sizes)
    labels = np.repeat(group_class, sizes)
    flip = rng.random(len(labels)) < 0.1
    labels[flip] = rng.integers(0, num_classes, flip.sum())
    return groups, labels


def test_greedy_split_keeps_groups_whole_fractions_and_proportions():
    groups, labels = _grouped_dataset()
    fractions = (0.7, 0.15, 0.15)
    assign = splits.greedy_stratified_split(groups, labels, 3, fractions, seed=0)
    assert splits.straddling_groups(groups, assign) == 0
    overall = np.bincount(labels, minlength=3) / len(labels)
    for s, frac in enumerate(fractions):
        member = assign == s
        assert abs(member.mean() - frac) < 0.02
        proportions = np.bincount(labels[member], minlength=3) / member.sum()
        np.testing.assert_allclose(proportions, overall, atol=0.02)


def test_greedy_split_is_deterministic_and_seeded():
    groups, labels = _grouped_dataset()
    a = splits.greedy_stratified_split(groups, labels, 3, (0.7, 0.15, 0.15), seed=1)
    b = splits.greedy_stratified_split(groups, labels, 3, (0.7, 0.15, 0.15), seed=1)
    c = splits.greedy_stratified_split(groups, labels, 3, (0.7, 0.15, 0.15), seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_greedy_split_zero_fraction_split_gets_nothing():
    groups, labels = _grouped_dataset(num_groups=50)
    assign = splits.greedy_stratified_split(groups, labels, 3, (0.8, 0.2, 0.0), seed=0)
    assert set(assign.tolist()) == {0, 1}


def test_iterative_stratification_hand_made_example():
    # Columns A, B, C with 2, 4 and 8 positives, 12 rows, two equal halves (test 0).
    # Each label can be split exactly in half; iterative stratification must do so.
    y = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [0, 1, 0], [0, 0, 1], [0, 0, 1],
                  [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0], [0, 1, 1], [0, 0, 0]])
    assert y.sum(axis=0).tolist() == [2, 4, 8]
    for seed in range(5):
        assign = splits.iterative_stratified_split(np.arange(12), y, (0.5, 0.5, 0.0), seed)
        assert np.bincount(assign, minlength=3).tolist() == [6, 6, 0]
        for s in (0, 1):
            assert y[assign == s].sum(axis=0).tolist() == [1, 2, 4]


def test_iterative_stratification_rarest_label_first():
    # Label 1 has only 2 positives: they must land in different splits, though they
    # also carry the common label 0 (a random split would pair them half the time).
    y = np.array([[1, 1], [1, 1], [1, 0], [1, 0], [0, 0], [0, 0]])
    for seed in range(5):
        assign = splits.iterative_stratified_split(np.arange(6), y, (0.5, 0.5, 0.0), seed)
        assert assign[0] != assign[1]


def test_iterative_stratification_respects_groups():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(200), 2)
    y = (rng.random((400, 4)) < [0.5, 0.2, 0.1, 0.03]).astype(int)
    assign = splits.iterative_stratified_split(groups, y, (0.7, 0.15, 0.15), seed=0)
    assert splits.straddling_groups(groups, assign) == 0
    for s, frac in enumerate((0.7, 0.15, 0.15)):
        assert abs((assign == s).mean() - frac) < 0.03
        share = y[assign == s].sum(axis=0) / y.sum(axis=0)
        np.testing.assert_allclose(share, frac, atol=0.1)


def test_parse_fractions_and_split_column():
    assert splits.parse_fractions("0.7,0.15,0.15") == (0.7, 0.15, 0.15)
    for bad in ("0.7,0.3", "0.5,0.5,0.5", "a,b,c", "0,0.5,0.5", "1.2,-0.1,-0.1"):
        with pytest.raises(ValueError, match="--split"):
            splits.parse_fractions(bad)
    assert splits.split_column_indices(["test", "train", "val"]).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="--split_column"):
        splits.split_column_indices(["train", "holdout"])


def test_straddling_groups_counts():
    assert splits.straddling_groups(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 2, 2, 0])) == 1


def test_class_counts_and_rare_classes():
    assert splits.class_counts([0, 2, 2], 4, multilabel=False) == [1, 0, 2, 0]
    assert splits.class_counts([(1, 0), (1, 1)], 2, multilabel=True) == [2, 1]
    assert splits.class_counts([], 2, multilabel=True) == [0, 0]
    assert splits.rare_classes([5, 1, 3, 0], min_count=3) == [1, 3]

"""Grouped, stratified train/val/test splits and rare-class dropping (numpy only).

Groups are the connected components of "same patient" OR "identical image bytes"
(OR "listed together in a duplicates CSV"), so neither a patient nor a duplicated
photograph can straddle two splits. Whole groups are then assigned to splits:

- single-label: a greedy, StratifiedGroupKFold-style assignment, largest groups
  first, each to the split where it most reduces the squared per-class deviation
  from the target counts;
- multi-label: iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML
  PKDD 2011), applied to groups instead of single examples.

Everything is deterministic given the seed.
"""

import collections
import hashlib
import os
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- flags


def parse_fractions(text: str) -> tuple[float, float, float]:
    """"0.7,0.15,0.15" -> (0.7, 0.15, 0.15); raises ValueError naming --split."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as e:
        raise ValueError(f"--split: expected 3 comma-separated fractions, got {text!r}") from e
    if len(values) != 3:
        raise ValueError(f"--split: expected 3 fractions (train,val,test), got {text!r}")
    if any(v < 0 for v in values) or values[0] <= 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"--split: fractions must be >= 0, train > 0 and sum to 1, "
                         f"got {text!r}")
    return values


# ----------------------------------------------------------------------------- groups


class UnionFind:
    """Disjoint sets over 0..n-1; the smallest member is each set's root (deterministic)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> bool:
        """Joins the sets of i and j; returns True when they were separate."""
        a, b = self.find(i), self.find(j)
        if a == b:
            return False
        self.parent[max(a, b)] = min(a, b)
        return True

    def union_all(self, members: Sequence[int]) -> int:
        """Joins all members; returns how many separate sets were merged."""
        return sum(self.union(members[0], m) for m in members[1:])


def file_digest(path: str, chunk: int = 1 << 20) -> str | None:
    """sha256 of a file's bytes, or None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def identical_files(paths: Sequence[str]) -> list[list[int]]:
    """Indices of byte-identical files, as lists of >= 2 (only same-size files are hashed).

    Hashing every file would read the whole dataset twice; identical files have
    equal sizes, and equal JPEG sizes are rare, so this reads few bytes.
    """
    by_size = collections.defaultdict(list)
    for i, p in enumerate(paths):
        try:
            size = os.path.getsize(p)
        except OSError:
            continue
        if size > 0:
            by_size[size].append(i)
    by_digest = collections.defaultdict(list)
    for members in by_size.values():
        if len(members) > 1:
            for i in members:
                digest = file_digest(paths[i])
                if digest is not None:
                    by_digest[digest].append(i)
    return [m for m in by_digest.values() if len(m) > 1]


def group_rows(patient_ids: Sequence[str], paths: Sequence[str],
               extra_groups: Sequence[Sequence[int]] = (),
               identical: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, dict]:
    """Connected components of same-patient, same-bytes and `extra_groups` rows.

    Args:
        patient_ids: per row; "" means unknown (the row is then only its own patient).
        paths: per row, absolute file paths (for the byte comparison).
        extra_groups: row index lists that must stay together (e.g. a duplicates CSV).
        identical: `identical_files(paths)` when the caller already has it (hashing
            reads files: do it once).
    Returns:
        (int64 [N] group id = smallest row index of the component, stats dict).
    """
    uf = UnionFind(len(paths))
    by_patient = collections.defaultdict(list)
    for i, pid in enumerate(patient_ids):
        if pid != "":
            by_patient[pid].append(i)
    for members in by_patient.values():
        uf.union_all(members)
    duplicates = identical_files(paths) if identical is None else [list(m) for m in identical]
    merged_bytes = sum(uf.union_all(m) for m in duplicates)
    merged_extra = sum(uf.union_all(list(m)) for m in extra_groups if len(m) > 1)
    groups = np.array([uf.find(i) for i in range(len(paths))], dtype=np.int64)
    stats = {"num_groups": int(len(np.unique(groups))),
             "identical_file_sets": len(duplicates),
             "groups_merged_by_identical_bytes": int(merged_bytes),
             "groups_merged_by_duplicates_csv": int(merged_extra)}
    return groups, stats


# ----------------------------------------------------------------------------- assignment


def _group_table(groups: np.ndarray, label_matrix: np.ndarray):
    """-> (unique group ids [G], per-group row counts [G], per-group label sums [G, C])."""
    ids, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(ids))
    sums = np.zeros((len(ids), label_matrix.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, label_matrix)
    return ids, inverse, sizes, sums


def greedy_stratified_split(groups: np.ndarray, labels: np.ndarray, num_classes: int,
                            fractions: Sequence[float], seed: int) -> np.ndarray:
    """Single-label grouped stratified split.

    Groups are visited largest first (ties in a seeded random order); each goes to
    the split where adding it least increases the chi-square distance between the
    split's class counts and its targets, sum_c (n_sc - t_sc)^2 / t_sc. Dividing by
    t_sc compares *relative* deficits: a small split and a rare class weigh as much
    as the big ones (an absolute error would pour the early, large groups into
    train just because train's absolute deficit is largest).

    Args:
        groups: int [N] group id per row.
        labels: int [N] class index per row, in 0..num_classes-1.
        fractions: [S] target fraction per split (sums to 1).
    Returns:
        int [N] split index per row.
    """
    onehot = np.eye(num_classes)[np.asarray(labels, dtype=np.int64)]
    _, inverse, sizes, sums = _group_table(groups, onehot)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(sizes)), -sizes))
    fractions = np.asarray(fractions, dtype=np.float64)
    target = fractions[:, None] * sums.sum(axis=0)[None, :]  # [S, C]
    inv_target = 1.0 / np.maximum(target, 1e-3)
    counts = np.zeros_like(target)
    assign = np.empty(len(sizes), dtype=np.int64)
    closed = fractions <= 0
    for g in order:
        cost = (((counts + sums[g] - target) ** 2 - (counts - target) ** 2)
                * inv_target).sum(axis=1)
        s = int(np.argmin(np.where(closed, np.inf, cost)))
        assign[g] = s
        counts[s] += sums[g]
    return assign[inverse]


def iterative_stratified_split(groups: np.ndarray, label_matrix: np.ndarray,
                               fractions: Sequence[float], seed: int) -> np.ndarray:
    """Multi-label grouped split by iterative stratification (Sechidis et al. 2011).

    Repeatedly takes the label with the fewest positives still unassigned and
    hands each group holding it (largest first) to the split that most wants that
    label (ties: the split wanting most examples, then a seeded random choice).
    Groups without any positive go where most examples are still wanted.

    Args:
        groups: int [N] group id per row.
        label_matrix: 0/1 [N, C].
        fractions: [S] target fraction per split.
    Returns:
        int [N] split index per row.
    """
    label_matrix = np.asarray(label_matrix, dtype=np.float64)
    _, inverse, sizes, sums = _group_table(groups, label_matrix)
    rng = np.random.default_rng(seed)
    fractions = np.asarray(fractions, dtype=np.float64)
    wanted_label = fractions[:, None] * sums.sum(axis=0)[None, :]  # [S, C]
    wanted_size = fractions * sizes.sum()  # [S]
    closed = fractions <= 0
    assign = np.full(len(sizes), -1, dtype=np.int64)
    tie = rng.permutation(len(sizes))  # fixed random tie-break per group
    remaining = sums.copy()  # positives per label among unassigned groups

    def give(g: int, s: int) -> None:
        assign[g] = s
        wanted_label[s] -= sums[g]
        wanted_size[s] -= sizes[g]
        remaining[g] = 0

    def best_split(primary: np.ndarray) -> int:
        keys = np.lexsort((rng.random(len(primary)), -wanted_size,
                           -np.where(closed, -np.inf, primary)))
        return int(keys[0])

    while True:
        per_label = remaining.sum(axis=0)
        live = np.flatnonzero(per_label > 0)
        if len(live) == 0:
            break
        c = live[np.argmin(per_label[live])]  # rarest label; argmin picks the first on ties
        holders = np.flatnonzero(remaining[:, c] > 0)
        for g in holders[np.lexsort((tie[holders], -sizes[holders]))]:
            give(g, best_split(wanted_label[:, c]))
    for g in np.flatnonzero(assign < 0)[np.argsort(tie[assign < 0])]:
        give(g, best_split(wanted_size))
    return assign[inverse]


def split_column_indices(values: Sequence[str]) -> np.ndarray:
    """Existing split names (train/val/test) -> split index per row; ValueError naming it."""
    index = {name: i for i, name in enumerate(SPLITS)}
    bad = sorted({v for v in values if v not in index})
    if bad:
        raise ValueError(f"--split_column: values must be train/val/test, found {bad[:5]}")
    return np.array([index[v] for v in values], dtype=np.int64)


def straddling_groups(groups: np.ndarray, split: np.ndarray) -> int:
    """Number of groups whose rows lie in more than one split (0 for a sound split)."""
    pairs = np.unique(np.stack([groups, split], axis=1), axis=0)
    _, per_group = np.unique(pairs[:, 0], return_counts=True)
    return int((per_group > 1).sum())


# ----------------------------------------------------------------------------- rare classes


def rare_classes(counts: Sequence[int], min_count: int) -> list[int]:
    """Indices of classes/labels with fewer than `min_count` positives."""
    return [i for i, n in enumerate(counts) if n < min_count]


def class_counts(labels, num_classes: int, multilabel: bool) -> list[int]:
    """Examples per class (single-label) or positives per label (multilabel)."""
    if multilabel:
        if len(labels) == 0:
            return [0] * num_classes
        return [int(v) for v in np.asarray(list(labels), dtype=np.int64).sum(axis=0)]
    return [int(v) for v in np.bincount(np.asarray(list(labels), dtype=np.int64),
                                        minlength=num_classes)]

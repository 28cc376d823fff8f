"""Patient-level (cluster) bootstrap confidence intervals.

Images of one patient (two eyes, repeat visits) are correlated, so resampling
images would give intervals that are too narrow. Each replicate instead draws
patients with replacement and takes all of their images.
"""

from collections.abc import Callable, Mapping, Sequence

import numpy as np

# A statistic maps an index array into the evaluation arrays to a float, or to
# None where the statistic is undefined on that resample (e.g. AUC with one class).
Statistic = Callable[[np.ndarray], float | None]


def patient_groups(num_examples: int,
                   patient_ids: Sequence | np.ndarray | None) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray]:
    """Groups example indices by patient.

    Args:
        num_examples: N.
        patient_ids: [N] ids (any hashable dtype), or None: every image is its own patient.
            Empty ids ("" = unknown) are each treated as a separate patient.

    Returns:
        (order, starts, counts): `order[starts[p]:starts[p] + counts[p]]` are the int64
        example indices of patient p; P = len(starts).
    """
    if patient_ids is None:
        idx = np.arange(num_examples)
        return idx, idx.copy(), np.ones(num_examples, np.int64)
    ids = np.asarray(patient_ids).astype(str)
    if len(ids) != num_examples:
        raise ValueError(f"{len(ids)} patient ids for {num_examples} examples")
    unknown = ids == ""
    ids = np.where(unknown, np.char.add("__unknown_", np.arange(num_examples).astype(str)), ids)
    _, codes = np.unique(ids, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return order, starts, counts


def resample_indices(rng: np.random.Generator, order: np.ndarray, starts: np.ndarray,
                     counts: np.ndarray) -> np.ndarray:
    """One cluster-bootstrap replicate: example indices of P patients drawn with replacement."""
    picked = rng.integers(0, len(starts), size=len(starts))
    lengths = counts[picked]
    # Position j of the output belongs to picked patient i; its source position in
    # `order` is starts[picked[i]] + (j - first output position of i).
    first_out = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    shift = np.repeat(starts[picked] - first_out, lengths)
    return order[np.arange(lengths.sum()) + shift]


def bootstrap_ci(statistics: Mapping[str, Statistic], num_examples: int,
                 patient_ids: Sequence | np.ndarray | None = None, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Percentile confidence intervals, all statistics computed on the same replicates.

    Args:
        statistics: name -> statistic (see `Statistic`).
        num_examples: N, the length of the arrays the statistics index into.
        patient_ids: [N] patient ids, or None for an image-level bootstrap.
        n_boot: number of replicates.
        seed: seed of the replicate generator (fixed, so reports are reproducible).
        level: coverage, e.g. 0.95.

    Returns:
        name -> {"low", "high", "level", "n_boot", "n_valid", "method"}; "low"/"high" are
        None with a "reason" when no replicate gave a defined value.
    """
    groups = patient_groups(num_examples, patient_ids)
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {name: [] for name in statistics}
    for _ in range(n_boot):
        idx = resample_indices(rng, *groups)
        for name, stat in statistics.items():
            v = stat(idx)
            if v is not None and np.isfinite(v):
                values[name].append(float(v))
    method = "patient_cluster_percentile" if patient_ids is not None else "image_percentile"
    tail = 100.0 * (1.0 - level) / 2.0
    out = {}
    for name, vals in values.items():
        ci = {"level": level, "n_boot": n_boot, "n_valid": len(vals), "method": method}
        if vals:
            low, high = np.percentile(vals, [tail, 100.0 - tail])
            ci.update(low=float(low), high=float(high))
        else:
            ci.update(low=None, high=None, reason="undefined on every bootstrap replicate")
        out[name] = ci
    return out

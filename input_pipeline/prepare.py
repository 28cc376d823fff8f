"""CLI: a folder of images + a label CSV -> split, sharded TFRecords.

    python -m input_pipeline.prepare --labels_csv=labels.csv --images_dir=images \\
        --out_dir=prepared --task=dr_grade --label_column=level --workers=4

Writes into --out_dir:
  {train,val,test}-{i:05d}-of-{n:05d}.tfrecord   (features.py spec, JPEG images)
  dataset.json    (schema in docs/ARCHITECTURE.md)
  rejected.csv    (row,path,reason: every row that was not written, and why)
  conversions.csv (row,path,conversions: rows whose image was converted, e.g.
                   "exif_orientation;16bit->8bit", see input_pipeline/image_decode.py)
  .state/         (resume bookkeeping: plan fingerprint + one sidecar per finished shard)

How it works:
1. Configuration and the label table are checked before any image is read;
   a bad flag or missing column stops at once with a message naming it.
2. The plan (rejections known from the table, groups, split, shard and write
   order of every row, upsampled copies) is computed up front and is a pure
   function of the CSV, the flags and --seed.
3. Images stream through a thread pool running `preprocessing.process_image`
   (the TF pre-processing the exported model runs too; TF ops release the GIL)
   that returns JPEG bytes; the main process serialises and writes one shard at a
   time to `<shard>.fundusflow-partial`, renames it when complete and then writes
   `.state/<shard>.json`. Memory is bounded by one shard, not by the dataset;
   --workers (default: auto) is bounded by CPUs and by available memory /
   WORKER_MEMORY_BYTES.
4. A re-run with the same plan skips finished shards and redoes the others, so
   a run killed at any point and re-run gives byte-identical shards. An out_dir
   holding shards of another plan (or shards with no .state record) is refused
   unless --overwrite; only prepare's own files are ever deleted.
5. dataset.json lists the exact shard files of each split; readers
   (pipeline.shard_files) read that list, never a glob.

Rows rejected before any image is read (rejected.csv reasons): paths escaping
--images_dir by name or through a symlink, dangling or looping symlinks,
unknown / non-finite / out-of-range labels (naming value and column), a file
listed twice ("duplicate row"; with different labels every such row is
"label conflict with row N"), byte-identical files with different labels
("label conflict with row N (identical bytes)"). dataset.json["label_conflicts"]
lists the conflicting sets.

--num_shards is the TOTAL number of shards, shared between the splits in
proportion to their rows (at least one per non-empty split); 0 (default) means
one shard per --examples_per_shard rows of each split.
--positive_threshold (binary only): a numeric label >= threshold is class 1,
e.g. a DR grade >= 2 -> referable. --label_map maps raw values to class indices
("none:0,npdr:1,pdr:1"). Row numbers in rejected.csv are 0-based row indices of
the source table (for CSV sources: the data row, header excluded; ODIR has two
rows per CSV line, left eye first).
"""

import collections
import concurrent.futures
import csv
import dataclasses
import errno
import hashlib
import json
import os
import re
import sys
import time

import numpy as np
import pandas as pd
from absl import app, flags, logging
from tqdm import tqdm

from input_pipeline import modality as modality_lib
from input_pipeline import preprocessing, sources, splits

CROPS = ("fundus", "none")
# No "lab": the one pre-processing (also run inside the exported model) has
# green-channel CLAHE only.
CLAHES = ("none", "green")
BALANCES = ("none", "upsample")
STATE_DIR = ".state"
TMP_SUFFIX = sources.TMP_SUFFIX
SHARD_NAME = re.compile(r"(train|val|test)-\d{5}-of-\d{5}\.tfrecord")
OUTPUT_FILES = ("dataset.json", "rejected.csv", "conversions.csv")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Every prepare option (the flags of the same name)."""

    labels_csv: str
    out_dir: str
    images_dir: str | None = None
    source: str = "generic"
    task: str = "dr_grade"
    label_columns: tuple[str, ...] = ()
    image_column: str | None = None
    class_names: tuple[str, ...] | None = None
    positive_threshold: float | None = None
    label_map: str | None = None
    image_size: int = 512
    crop: str = "fundus"
    modality: str | None = None  # None: from crop (input_pipeline/modality.py)
    clahe: str = "none"
    ben_graham: bool = False
    ben_graham_sigma: float = 10.0
    jpeg_quality: int = 95
    dark_threshold: float = preprocessing.DARK_MEAN_THRESHOLD
    small_field_fraction: float = preprocessing.SMALL_FIELD_FRACTION
    small_field_pixels: float = preprocessing.SMALL_FIELD_PIXELS
    split: str = "0.7,0.15,0.15"
    split_column: str | None = None
    group_column: str | None = None
    duplicates_csv: str | None = None
    min_class_count: int = 0
    balance: str = "none"
    num_shards: int = 0
    examples_per_shard: int = 1024
    workers: int = 1
    seed: int = 0
    overwrite: bool = False


def check_config(cfg: PrepareConfig) -> None:
    """Raises ValueError naming the flag of the first invalid option."""
    from_choices = {"task": (cfg.task, ("dr_grade", "binary", "multiclass", "multilabel")),
                    "crop": (cfg.crop, CROPS), "clahe": (cfg.clahe, CLAHES),
                    "balance": (cfg.balance, BALANCES),
                    "modality": (cfg.modality or "fundus", modality_lib.MODALITIES)}
    for flag, (value, choices) in from_choices.items():
        if value not in choices:
            raise ValueError(f"--{flag}: {value!r} is not one of {', '.join(choices)}")
    splits.parse_fractions(cfg.split)
    sources.parse_label_map(cfg.label_map)
    checks = {"image_size": cfg.image_size >= 8, "jpeg_quality": 1 <= cfg.jpeg_quality <= 100,
              "workers": cfg.workers >= 1, "num_shards": cfg.num_shards >= 0,
              "examples_per_shard": cfg.examples_per_shard >= 1,
              "min_class_count": cfg.min_class_count >= 0,
              "dark_threshold": 0 <= cfg.dark_threshold <= 255,
              "small_field_fraction": cfg.small_field_fraction >= 0,
              "small_field_pixels": cfg.small_field_pixels >= 0,
              "positive_threshold": cfg.positive_threshold is None or cfg.task == "binary",
              "out_dir": bool(cfg.out_dir)}
    for flag, ok in checks.items():
        if not ok:
            only = " (binary task only)" if flag == "positive_threshold" else ""
            raise ValueError(f"--{flag}: invalid value {getattr(cfg, flag)!r}{only}")


# Memory one worker may need at peak: the largest image the pixel cap admits,
# decoded and converted (a few copies of 60 MP x 3 bytes), plus its encoded bytes.
WORKER_MEMORY_BYTES = 1536 << 20


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable, capped by a cgroup v2
    limit when the process runs in a container), or None when unknown."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def default_workers(memory: int | None = None, cpus: int | None = None) -> int:
    """min(usable CPUs, available memory // WORKER_MEMORY_BYTES), at least 1.

    One process per CPU would multiply the peak of a huge image by the core count
    (issue: 5.9 GB per 60 MP 16-bit RGBA PNG) and get the run OOM-killed.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    memory = available_memory() if memory is None else memory
    by_memory = cpus if memory is None else memory // WORKER_MEMORY_BYTES
    return max(1, min(cpus, by_memory))


def preprocess_config(cfg: PrepareConfig) -> preprocessing.PreprocessConfig:
    return preprocessing.PreprocessConfig(
            image_size=cfg.image_size, crop=cfg.crop,
            clahe=None if cfg.clahe == "none" else cfg.clahe, ben_graham=cfg.ben_graham,
            ben_graham_sigma=cfg.ben_graham_sigma, jpeg_quality=cfg.jpeg_quality,
            dark_threshold=cfg.dark_threshold, small_field_fraction=cfg.small_field_fraction,
            small_field_pixels=cfg.small_field_pixels)


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Shard:
    """One output file: `entries` are table rows in write order (upsampled rows repeat)."""

    name: str
    split: str
    entries: list[int]

    def unique_rows(self) -> list[int]:
        return list(dict.fromkeys(self.entries))


@dataclasses.dataclass
class Plan:
    """Everything decided before reading images.

    table columns: row, path, label, patient_id, abs_path, rel_path, y (encoded label
    or None), reason (pre-image rejection or None), split (index into splits.SPLITS, -1).
    """

    table: pd.DataFrame
    class_names: list[str]
    dropped_classes: list[str]
    shards: list[Shard]
    split_info: dict
    label_conflicts: list[dict] = dataclasses.field(default_factory=list)

    def fingerprint(self, cfg: PrepareConfig) -> str:
        """Hash of everything that determines the output bytes (not workers/overwrite)."""
        options = dataclasses.asdict(cfg)
        # modality only labels dataset.json (augmentation defaults), not the shards.
        options.pop("workers"), options.pop("overwrite"), options.pop("modality")
        # 224 from Python and 224.0 from a float flag are the same plan.
        options.update({f.name: float(options[f.name]) for f in dataclasses.fields(cfg)
                        if f.type in (float, "float") and options[f.name] is not None})
        t = self.table
        blob = json.dumps({"cfg": options, "classes": self.class_names,
                           "rows": [list(t.abs_path), [str(y) for y in t.y], list(t.patient_id)],
                           "shards": [[s.name, s.entries] for s in self.shards]},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def resolve_path(path: str, images_dir: str,
                 real_dir: str | None = None) -> tuple[str, str, str | None]:
    """-> (absolute path, path relative to images_dir, reason it is unusable or None).

    A path must stay inside images_dir by name *and* once symlinks are resolved
    (`real_dir`: images_dir's real path; computed when not given): a link to
    another folder would otherwise smuggle in files the README promises to reject.
    A dangling or looping symlink is rejected here too. A plain missing file is
    left to the image reader, which names it.
    """
    if not path:
        return "", "", "empty path"
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(images_dir, path))
    rel = os.path.relpath(full, images_dir)
    if _escapes(rel):
        return full, rel, "path outside --images_dir"
    return full, rel, _link_problem(full, real_dir or os.path.realpath(images_dir))


def _escapes(rel: str) -> bool:
    return rel == os.pardir or rel.startswith(os.pardir + os.sep)


def _link_problem(full: str, real_dir: str) -> str | None:
    """Why a path inside images_dir by name is unusable through its symlinks, or None."""
    if os.path.lexists(full) and not os.path.exists(full):
        try:
            os.stat(full)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "symlink loop"
        return f"dangling symlink (to {os.readlink(full)!r})" if os.path.islink(full) \
            else "dangling symlink"
    real = os.path.realpath(full)
    if _escapes(os.path.relpath(real, real_dir)):
        return f"path outside --images_dir (resolves to {real})"
    return None


def _pre_reject(table: pd.DataFrame, source: sources.Source, spec: sources.LabelSpec,
                class_names: list[str]) -> tuple[list[dict], list[list[int]]]:
    """Adds abs_path, rel_path, y, reason: path, label, duplicate-row and conflict checks.

    Returns (label conflicts for dataset.json, sets of kept rows with identical bytes).
    """
    real_dir = os.path.realpath(source.images_dir)
    resolved = [resolve_path(p, source.images_dir, real_dir) for p in table["path"]]
    table["abs_path"] = [r[0] for r in resolved]
    table["rel_path"] = [r[1] for r in resolved]
    encoded, label_reasons = sources.encode_labels(table, spec, class_names,
                                                   source.label_columns)
    table["y"] = pd.Series(encoded, dtype=object)
    table["reason"] = pd.Series([r[2] or lr for r, lr in zip(resolved, label_reasons,
                                                                strict=True)], dtype=object)
    conflicts = _reject_duplicate_rows(table)
    same_bytes = [rows for rows in _identical_rows(table) if len(rows) > 1]
    conflicts += _reject_conflicts(table, same_bytes, "identical bytes")
    return conflicts, [rows for rows in same_bytes if table.at[rows[0], "reason"] is None]


def _reject_duplicate_rows(table: pd.DataFrame) -> list[dict]:
    """Rows naming one file: with one label the first row wins, the others are
    "duplicate row"; with different labels all are rejected as a label conflict."""
    ok = table["reason"].isna()
    by_path = collections.defaultdict(list)
    for r, full in zip(table.index[ok], table.loc[ok, "abs_path"], strict=True):
        by_path[full].append(int(r))
    sets = [rows for rows in by_path.values() if len(rows) > 1]
    for rows in sets:
        if _agree(table, rows):
            table.loc[rows[1:], "reason"] = "duplicate row"
    return _reject_conflicts(table, sets, "same path")


def _identical_rows(table: pd.DataFrame) -> list[list[int]]:
    """Sets of kept rows whose files are byte-identical (splits.identical_files)."""
    ok = table.index[table["reason"].isna()]
    sets = splits.identical_files(list(table.loc[ok, "abs_path"]))
    return [[int(ok[i]) for i in members] for members in sets]


def _agree(table: pd.DataFrame, rows: list[int]) -> bool:
    return len({table.at[r, "y"] for r in rows}) == 1


def _reject_conflicts(table: pd.DataFrame, sets: list[list[int]], kind: str) -> list[dict]:
    """Rejects every row of each set whose encoded labels differ; returns the records.

    Which label is right cannot be known, so none is kept: a conflicting pair in
    train and test would otherwise teach and grade opposite answers for one image.
    """
    conflicts = []
    for rows in sets:
        if _agree(table, rows):
            continue
        suffix = "" if kind == "same path" else f" ({kind})"
        for r in rows:
            other = next(o for o in rows if o != r)
            table.at[r, "reason"] = f"label conflict with row {other}{suffix}"
        conflicts.append({"kind": kind, "rows": rows,
                          "paths": [table.at[r, "path"] for r in rows],
                          "labels": [table.at[r, "label"] for r in rows]})
    return conflicts


def _check_ordinal_drop(class_names, counts, rare, min_count) -> None:
    """dr_grade: only the highest grades may be dropped, so the others keep their numbers.

    Dropping an inner (or the lowest) grade would renumber the rest: grades 2,3,4
    would become 1,2,3, so "referable" (>= 2) would silently mean original >= 3 and
    the ordinal loss would treat grade 2 as grade 0's neighbour.
    """
    top = len(class_names) - len(rare)
    if sorted(rare) != list(range(top, len(class_names))):
        inner = [f"{class_names[i]} ({counts[i]} rows)" for i in rare if i < top]
        raise ValueError(
            f"--min_class_count={min_count} would drop grade(s) {', '.join(inner)} from "
            f"inside the ordinal scale {class_names} and renumber the grades above; lower "
            "--min_class_count, or merge grades with --task=multiclass --label_map")


def _drop_rare(table: pd.DataFrame, class_names: list[str], min_count: int,
               multilabel: bool, ordinal: bool = False) -> tuple[list[str], list[str]]:
    """Applies --min_class_count; returns (kept class names, dropped class names).

    Ordinal tasks (dr_grade) may lose only their highest grades (`_check_ordinal_drop`).
    """
    ok = table["reason"].isna()
    counts = splits.class_counts(table.loc[ok, "y"], len(class_names), multilabel)
    rare = splits.rare_classes(counts, min_count) if min_count > 0 else []
    if not rare:
        return class_names, []
    keep = [i for i in range(len(class_names)) if i not in rare]
    if ordinal:
        _check_ordinal_drop(class_names, counts, rare, min_count)
    if len(keep) < (1 if multilabel else 2):
        raise ValueError(f"--min_class_count={min_count} would drop all classes {class_names}")
    new_index = {old: new for new, old in enumerate(keep)}
    if multilabel:
        table.loc[ok, "y"] = pd.Series([tuple(y[i] for i in keep) for y in table.loc[ok, "y"]],
                                       index=table.index[ok], dtype=object)
    else:
        dropped = ok & table["y"].map(lambda y: y in rare)
        table.loc[dropped, "reason"] = "class dropped (min_class_count)"
        ok = table["reason"].isna()
        table.loc[ok, "y"] = table.loc[ok, "y"].map(new_index)
    return [class_names[i] for i in keep], [class_names[i] for i in rare]


def _duplicates_groups(path: str | None, table: pd.DataFrame, images_dir: str) -> list:
    """--duplicates_csv (columns group,image) -> lists of table rows to keep together."""
    if not path:
        return []
    df = sources.read_csv(path)
    sources.require_columns(df, ["group", "image"], "--duplicates_csv")
    where = {p: i for i, p in enumerate(table["abs_path"])}
    groups = collections.defaultdict(list)
    for group, image in zip(df["group"], df["image"], strict=True):
        full = resolve_path(image, images_dir)[0]
        if full in where:
            groups[group].append(where[full])
    return list(groups.values())


def _assign_splits(cfg: PrepareConfig, table: pd.DataFrame, kept: np.ndarray,
                   class_names: list[str], images_dir: str,
                   same_bytes: list[list[int]]) -> dict:
    """Fills table["split"] for kept rows; returns the dataset.json "split" record.

    `same_bytes`: sets of table rows with identical files (hashed once, in _pre_reject).
    """
    sub = table.loc[kept]
    extra = _duplicates_groups(cfg.duplicates_csv, sub.reset_index(drop=True), images_dir)
    position = {r: i for i, r in enumerate(sub.index)}
    identical = [[position[r] for r in rows if r in position] for rows in same_bytes]
    groups, stats = splits.group_rows(list(sub["patient_id"]), list(sub["abs_path"]), extra,
                                      identical=[m for m in identical if len(m) > 1])
    fractions = splits.parse_fractions(cfg.split)
    multilabel = cfg.task == "multilabel"
    if "split" in table.columns:
        assign = splits.split_column_indices(list(sub["split"]))
        method = "column"
    elif multilabel:
        assign = splits.iterative_stratified_split(groups, np.array(list(sub["y"])),
                                                   fractions, cfg.seed)
        method = "grouped_iterative_stratified"
    else:
        assign = splits.greedy_stratified_split(groups, np.array(list(sub["y"])),
                                                len(class_names), fractions, cfg.seed)
        method = "grouped_stratified"
    table["split"] = -1
    table.loc[kept, "split"] = assign
    straddling = splits.straddling_groups(groups, assign)
    if straddling:
        logging.warning("%d groups (patient / identical bytes) straddle the given splits",
                        straddling)
    return {"method": method, "fractions": list(fractions) if method != "column" else None,
            "group_column": cfg.group_column or ("patient_id" if (sub["patient_id"] != "").any()
                                                 else None),
            "seed": cfg.seed, "duplicates_csv": cfg.duplicates_csv,
            "straddling_groups": straddling, **stats}


def _shards_per_split(cfg: PrepareConfig, sizes: dict[str, int]) -> dict[str, int]:
    """--num_shards (total, proportional, >= 1 per non-empty split) or auto."""
    total = sum(sizes.values())
    out = {}
    for name, n in sizes.items():
        if n == 0:
            out[name] = 0
        elif cfg.num_shards:
            out[name] = max(1, round(cfg.num_shards * n / total))
        else:
            out[name] = -(-n // cfg.examples_per_shard)
    return out


def _upsample(rows: list[int], labels: list, num_classes: int, multilabel: bool) -> list[int]:
    """Extra copies (row indices) so that classes are roughly balanced.

    Single-label: every class is repeated round-robin up to the largest class.
    Multi-label: each example counts for its rarest positive label; labels are
    topped up from the rarest, the copies also counting for the other labels.
    """
    counts = np.array(splits.class_counts(labels, num_classes, multilabel), dtype=np.int64)
    if not multilabel:
        by_class = collections.defaultdict(list)
        for r, y in zip(rows, labels, strict=True):
            by_class[y].append(r)
        target = counts.max()
        return [members[k % len(members)] for c, members in sorted(by_class.items())
                for k in range(target - counts[c])]
    matrix = np.array(labels, dtype=np.int64).reshape(len(rows), num_classes)
    masked = np.where(matrix > 0, counts[None, :], np.iinfo(np.int64).max)
    rarest = np.where(matrix.any(axis=1), masked.argmin(axis=1), -1)
    target, extra = counts.max(), []
    for c in np.argsort(counts, kind="stable"):
        members = [i for i in range(len(rows)) if rarest[i] == c]
        k = 0
        while members and counts[c] < target:
            i = members[k % len(members)]
            extra.append(rows[i])
            counts += matrix[i]
            k += 1
    return extra


def _make_shards(cfg: PrepareConfig, table: pd.DataFrame, num_classes: int) -> list[Shard]:
    """Shuffles each split (seeded), cuts it into shards, adds upsampled train copies."""
    rng = np.random.default_rng(cfg.seed)
    multilabel = cfg.task == "multilabel"
    members = {name: rng.permutation(np.flatnonzero(table["split"].to_numpy() == i)).tolist()
               for i, name in enumerate(splits.SPLITS)}
    per_split = _shards_per_split(cfg, {k: len(v) for k, v in members.items()})
    shards = []
    for name, rows in members.items():
        labels = [table.at[r, "y"] for r in rows]
        n = per_split[name]
        chunks = ([c.tolist() for c in np.array_split(np.array(rows, dtype=np.int64), n)]
                  if n else [])
        if name == "train" and cfg.balance == "upsample":
            chunks = _place_copies(chunks, _upsample(rows, labels, num_classes, multilabel),
                                   rng)
        shards += [Shard(f"{name}-{i:05d}-of-{n:05d}.tfrecord", name, c)
                   for i, c in enumerate(chunks)]
    return shards


def _place_copies(chunks: list[list[int]], copies: list[int], rng) -> list[list[int]]:
    """Puts each copy in its original's shard (bytes reused), then shuffles each shard."""
    home = {r: i for i, chunk in enumerate(chunks) for r in chunk}
    for r in copies:
        chunks[home[r]].append(r)
    return [rng.permutation(np.array(c, dtype=np.int64)).tolist() for c in chunks]


def make_plan(cfg: PrepareConfig, source: sources.Source) -> Plan:
    """Decides rejections-from-table, classes, groups, splits and shards (no images read)."""
    spec = sources.LabelSpec(task=cfg.task, class_names=cfg.class_names,
                             positive_threshold=cfg.positive_threshold,
                             label_map=sources.parse_label_map(cfg.label_map))
    class_names = sources.resolve_class_names(spec, source)
    table = source.table.copy()
    conflicts, same_bytes = _pre_reject(table, source, spec, class_names)
    class_names, dropped = _drop_rare(table, class_names, cfg.min_class_count,
                                      cfg.task == "multilabel", cfg.task == "dr_grade")
    kept = table["reason"].isna().to_numpy()
    split_info = _assign_splits(cfg, table, kept, class_names, source.images_dir, same_bytes)
    shards = _make_shards(cfg, table, len(class_names))
    return Plan(table, class_names, dropped, shards, split_info, conflicts)


# ----------------------------------------------------------------------------- workers

def _encode_row(task: tuple[int, str], config: preprocessing.PreprocessConfig
                ) -> tuple[int, bytes | None, str | None, dict]:
    """(row, path) -> (row, JPEG bytes or None, rejection reason or None, info)."""
    row, path = task
    try:
        img, info = preprocessing.process_image(path, config)
    except preprocessing.ImageError as e:
        return row, None, e.reason, {}
    except Exception as e:  # noqa: BLE001 - one bad file must not stop 88k others
        return row, None, f"unexpected error: {type(e).__name__}: {e}", {}
    data = info.pop("jpeg")
    info = {k: v for k, v in info.items() if isinstance(v, bool | int | float | str)}
    info.update(height=int(img.shape[0]), width=int(img.shape[1]))
    return row, data, None, info


class _Encoder:
    """Ordered stream of encoded rows, from a thread pool or in-thread.

    At most workers * 4 rows are in flight (submitted, not yet consumed), so
    memory does not grow with the dataset; each decode is bounded by the caps of
    `image_decode` (pixels and decoded bytes).
    """

    DEPTH = 4

    def __init__(self, cfg: PrepareConfig, tasks: list):
        config = preprocess_config(cfg)
        self.pool = None
        if cfg.workers > 1:
            self.pool = concurrent.futures.ThreadPoolExecutor(cfg.workers)
            self.results = self._ordered(tasks, config, cfg.workers * self.DEPTH)
        else:
            self.results = (_encode_row(task, config) for task in tasks)

    def _ordered(self, tasks, config, depth: int):
        pending = collections.deque()
        for task in tasks:
            pending.append(self.pool.submit(_encode_row, task, config))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- writing


def _state_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, STATE_DIR, name + ".json")


def _write_json(path: str, obj) -> None:
    tmp = path + TMP_SUFFIX
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def _load_done(out_dir: str, shard: Shard) -> dict | None:
    """The sidecar of a finished shard whose file is intact, else None."""
    try:
        with open(_state_path(out_dir, shard.name)) as f:
            state = json.load(f)
        if os.path.getsize(os.path.join(out_dir, shard.name)) == state["size"]:
            return state
    except (OSError, ValueError, KeyError):
        pass
    return None


def _is_output(name: str) -> bool:
    """A file prepare writes into out_dir (shard, dataset.json, rejected.csv, their temps)."""
    name = name.removesuffix(TMP_SUFFIX)
    return bool(SHARD_NAME.fullmatch(name)) or name in OUTPUT_FILES


def _prepare_out_dir(cfg: PrepareConfig, fingerprint: str) -> None:
    """Creates out_dir/.state; refuses (or with --overwrite, clears) output of another plan.

    Another plan is a different fingerprint in .state/plan.json, or prepare output
    (shards, dataset.json) with no plan record at all: shards of an earlier plan
    must never sit beside this plan's, where a glob would mix them. Only prepare's
    own files are ever deleted (its temps carry TMP_SUFFIX); anything else in
    out_dir is left alone, with or without --overwrite.
    """
    state_dir = os.path.join(cfg.out_dir, STATE_DIR)
    plan_file = os.path.join(state_dir, "plan.json")
    previous = None
    if os.path.exists(plan_file):
        with open(plan_file) as f:
            previous = json.load(f).get("fingerprint")
    foreign = ([n for n in sorted(os.listdir(cfg.out_dir)) if _is_output(n)]
               if previous is None and os.path.isdir(cfg.out_dir) else [])
    if previous not in (None, fingerprint) or foreign:
        if not cfg.overwrite:
            what = ("output of a different plan (other CSV, flags or seed)" if previous
                    else f"prepare output with no plan record ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''})")
            raise ValueError(f"--out_dir: {cfg.out_dir} holds {what}; pass --overwrite "
                             "or a new --out_dir")
        _clear_outputs(cfg.out_dir)
    os.makedirs(state_dir, exist_ok=True)
    for name in os.listdir(cfg.out_dir):
        if name.endswith(TMP_SUFFIX) and _is_output(name):  # partial file of a killed run
            os.remove(os.path.join(cfg.out_dir, name))
    _write_json(plan_file, {"fingerprint": fingerprint})


def _clear_outputs(out_dir: str) -> None:
    """Deletes prepare's own files (shards, summaries, temps, .state/*.json) only."""
    for name in os.listdir(out_dir):
        if _is_output(name):
            os.remove(os.path.join(out_dir, name))
    state_dir = os.path.join(out_dir, STATE_DIR)
    for name in os.listdir(state_dir) if os.path.isdir(state_dir) else []:
        if name.endswith((".json", ".json" + TMP_SUFFIX)):
            os.remove(os.path.join(state_dir, name))


def _write_shard(cfg: PrepareConfig, plan: Plan, shard: Shard, results, progress) -> dict:
    """Consumes this shard's results, writes `<shard><TMP_SUFFIX>`, renames it, writes
    the sidecar."""
    import tensorflow as tf

    from input_pipeline import features

    encoded, rejected, quality, conversions = {}, [], collections.Counter(), {}
    for _ in range(len(shard.unique_rows())):
        row, data, reason, info = next(results)
        progress.update(1)
        if data is None:
            rejected.append([row, reason])
            continue
        encoded[row] = (data, info)
        quality.update(k for k, v in info.items() if k.startswith("quality_") and v is True)
        if info.get("converted"):
            conversions[str(row)] = info["converted"]
    path = os.path.join(cfg.out_dir, shard.name)
    t = plan.table
    num_records = 0
    with tf.io.TFRecordWriter(path + TMP_SUFFIX) as writer:
        for row in shard.entries:
            if row not in encoded:
                continue
            data, info = encoded[row]
            example = features.serialize_example(
                    data, t.at[row, "y"], height=info["height"], width=info["width"],
                    patient_id=t.at[row, "patient_id"], source=t.at[row, "rel_path"])
            # Protobuf writes map fields in an order that differs between processes;
            # sorted keys make a resumed run byte-identical to an uninterrupted one.
            example = tf.train.Example.FromString(example).SerializeToString(deterministic=True)
            writer.write(example)
            num_records += 1
    os.replace(path + TMP_SUFFIX, path)
    state = {"written": sorted(encoded), "rejected": sorted(rejected),
             "num_records": num_records, "quality": dict(sorted(quality.items())),
             "conversions": conversions,
             "size": os.path.getsize(path)}
    _write_json(_state_path(cfg.out_dir, shard.name), state)
    return state


def write_shards(cfg: PrepareConfig, plan: Plan) -> dict[str, dict]:
    """Writes every unfinished shard; returns {shard name: sidecar state}."""
    states = {s.name: _load_done(cfg.out_dir, s) for s in plan.shards}
    pending = [s for s in plan.shards if states[s.name] is None]
    if len(pending) < len(plan.shards):
        logging.info("resuming: %d of %d shards already done", len(plan.shards) - len(pending),
                     len(plan.shards))
    t = plan.table
    tasks = [(r, t.at[r, "abs_path"]) for s in pending for r in s.unique_rows()]
    total = len(tasks)
    encoder = _Encoder(cfg, tasks)
    try:
        with tqdm(total=total, unit="img", desc="prepare", smoothing=0.05) as progress:
            for shard in pending:
                state = _write_shard(cfg, plan, shard, encoder.results, progress)
                states[shard.name] = {**state, "this_run": True}
    finally:
        encoder.close()
    return states


# ----------------------------------------------------------------------------- summary


def _rejections(plan: Plan, states: dict[str, dict]) -> list[tuple[int, str, str]]:
    """(row, path, reason) of every row not written, sorted by row."""
    t = plan.table
    out = [(int(r), t.at[r, "path"], t.at[r, "reason"])
           for r in t.index[t["reason"].notna()]]
    out += [(int(r), t.at[r, "path"], reason) for s in states.values()
            for r, reason in s["rejected"]]
    return sorted(out)


def _reason_kind(reason: str) -> str:
    """A rejection reason without its per-row details (other row, link target), so that
    dataset.json's rejected_reasons histogram stays small; rejected.csv keeps them."""
    reason = re.sub(r"\brow \d+", "row N", reason)
    return re.sub(r" \((resolves )?to .*\)$", "", reason)


def summarize(cfg: PrepareConfig, source: sources.Source, plan: Plan,
              states: dict[str, dict], seconds: float, write_seconds: float) -> dict:
    """The dataset.json record; asserts rows read = written + rejected."""
    t, multilabel = plan.table, cfg.task == "multilabel"
    pp_cfg = preprocess_config(cfg)
    written = {r for s in states.values() for r in s["written"]}
    rejected = _rejections(plan, states)
    read = len(t)
    assert read == len(written) + len(rejected), (read, len(written), len(rejected))
    split_records = {}
    for name in splits.SPLITS:
        shards = [s for s in plan.shards if s.split == name]
        records = [r for s in shards for r in s.entries if r in written]
        unique = [r for r in dict.fromkeys(records)]
        split_records[name] = {
                "num_examples": len(records),
                "class_counts": splits.class_counts([t.at[r, "y"] for r in records],
                                                    len(plan.class_names), multilabel),
                "class_counts_before_balance": splits.class_counts(
                        [t.at[r, "y"] for r in unique], len(plan.class_names), multilabel),
                "files": [s.name for s in shards]}
    encoded = sum(len(s["written"]) + len(s["rejected"]) for s in states.values()
                  if s.get("this_run"))
    quality = collections.Counter()
    for s in states.values():
        quality.update(s["quality"])
    converted = _conversions(plan, states)
    conversion_counts = collections.Counter(c for _, _, names in converted
                                            for c in names.split(";"))
    reasons = collections.Counter(_reason_kind(reason) for _, _, reason in rejected)
    return {
            "task": cfg.task,
            "num_classes": len(plan.class_names),
            "class_names": plan.class_names,
            "label_columns": source.label_columns,
            "image_size": cfg.image_size,
            "image_format": "jpeg",
            "modality": cfg.modality or modality_lib.default_modality(cfg.crop),
            "preprocessing": {"crop": cfg.crop, "clahe": None if cfg.clahe == "none"
                              else cfg.clahe, "clahe_clip_limit": pp_cfg.clahe_clip_limit,
                              "clahe_tile_grid": pp_cfg.clahe_tile_grid,
                              "ben_graham": cfg.ben_graham,
                              "ben_graham_sigma": cfg.ben_graham_sigma,
                              "jpeg_quality": cfg.jpeg_quality},
            "splits": split_records,
            "rows": {"read": read, "written": len(written), "rejected": len(rejected),
                     "skipped_unknown_label": sum(
                             n for r, n in reasons.items()
                             if r.startswith(sources.UNKNOWN_LABEL)),
                     "label_conflicts": sum(len(c["rows"]) for c in plan.label_conflicts)},
            "rejected_reasons": dict(sorted(reasons.items())),
            # Same file (or identical bytes) listed with different labels: all rejected.
            "label_conflicts": plan.label_conflicts,
            "dropped_classes": plan.dropped_classes,
            "min_class_count": cfg.min_class_count,
            "balance": cfg.balance,
            "split": plan.split_info,
            "label_encoding": {"positive_threshold": cfg.positive_threshold,
                               "label_map": sources.parse_label_map(cfg.label_map)},
            "quality_flags": dict(sorted(quality.items())),
            # Images converted on decoding, per conversion (rows in conversions.csv).
            "conversions": dict(sorted(conversion_counts.items())),
            "quality_thresholds": {"dark_threshold": cfg.dark_threshold,
                                   "small_field_fraction": cfg.small_field_fraction,
                                   "small_field_pixels": cfg.small_field_pixels},
            "source": {"labels_csv": os.path.abspath(cfg.labels_csv) if cfg.labels_csv else None,
                       "images_dir": source.images_dir, "adapter": source.adapter},
            # Varies run to run (and covers only this run's shards after a resume).
            "timing": {"seconds": round(seconds, 3), "write_seconds": round(write_seconds, 3),
                       "workers": cfg.workers, "images_encoded": encoded,
                       "images_per_second": round(encoded / write_seconds, 2)
                       if write_seconds else None},
    }


def _conversions(plan: Plan, states: dict[str, dict]) -> list[tuple[int, str, str]]:
    """(row, path, ";"-joined conversions) of every written row whose image was converted."""
    t = plan.table
    rows = {int(r): names for s in states.values()
            for r, names in s.get("conversions", {}).items()}
    return [(r, t.at[r, "path"], rows[r]) for r in sorted(rows)]


def _write_csv(path: str, header: list[str], rows: list[tuple]) -> None:
    tmp = path + TMP_SUFFIX
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def run(cfg: PrepareConfig) -> dict:
    """Runs (or resumes) prepare; returns the dataset.json record."""
    start = time.perf_counter()
    check_config(cfg)
    source = sources.load_source(cfg.source, sources.SourceArgs(
            labels_csv=cfg.labels_csv, images_dir=cfg.images_dir,
            label_columns=tuple(cfg.label_columns), image_column=cfg.image_column,
            patient_column=cfg.group_column, split_column=cfg.split_column,
            multilabel=cfg.task == "multilabel", out_dir=cfg.out_dir))
    if source.table.empty:  # an empty dataset.json would only fail later, in training
        raise ValueError(f"--labels_csv: {cfg.labels_csv or source.images_dir}: 0 rows "
                         "(nothing to prepare)")
    plan = make_plan(cfg, source)
    _prepare_out_dir(cfg, plan.fingerprint(cfg))
    from input_pipeline import features  # noqa: F401 - the slow TF import, out of the timing

    write_start = time.perf_counter()
    states = write_shards(cfg, plan)
    now = time.perf_counter()
    summary = summarize(cfg, source, plan, states, now - start, now - write_start)
    _write_csv(os.path.join(cfg.out_dir, "rejected.csv"), ["row", "path", "reason"],
               _rejections(plan, states))
    _write_csv(os.path.join(cfg.out_dir, "conversions.csv"), ["row", "path", "conversions"],
               _conversions(plan, states))
    _write_json(os.path.join(cfg.out_dir, "dataset.json"), summary)
    return summary


# ----------------------------------------------------------------------------- CLI

def define_flags() -> None:
    """Defines the CLI flags (only when run as a program: other mains define
    --seed/--out_dir too, and spawned workers re-import this module)."""
    flags.DEFINE_string("labels_csv", None, "Label CSV (or the .npz for --source=npz; any "
                        "file for --source=folders is ignored).")
    flags.DEFINE_string("images_dir", None, "Folder the CSV's image paths are relative to "
                        "(default: the CSV's folder).")
    flags.DEFINE_string("out_dir", None, "Output folder.")
    flags.DEFINE_enum("source", "generic", list(sources.ADAPTERS), "Label-source adapter.")
    flags.DEFINE_string("task", "dr_grade", "dr_grade | binary | multiclass | multilabel.")
    flags.DEFINE_string("label_column", None, "Label column (single-label tasks).")
    flags.DEFINE_list("label_columns", None, "Label columns (multilabel), comma-separated.")
    flags.DEFINE_string("image_column", None, "Image column (generic; default: first of "
                        "image/path/filename/id_code/ID/id).")
    flags.DEFINE_list("class_names", None, "Class names in index order (optional).")
    flags.DEFINE_float("positive_threshold", None, "binary: numeric label >= this is positive "
                       "(e.g. 2 for referable DR from grades 0-4).")
    flags.DEFINE_string("label_map", None, "raw:index,... e.g. none:0,npdr:1,pdr:1.")
    flags.DEFINE_integer("image_size", 512, "Output side length in pixels.")
    flags.DEFINE_string("crop", "fundus", "fundus | none.")
    flags.DEFINE_string("modality", None, "fundus | oct | other: recorded in dataset.json, "
                        "sets the augmentation defaults; default: fundus for --crop=fundus, "
                        "else other.")
    flags.DEFINE_string("clahe", "none", "none | green (CLAHE on the green channel).")
    flags.DEFINE_bool("ben_graham", False, "Ben Graham local-colour normalisation.")
    flags.DEFINE_float("ben_graham_sigma", 10.0, "Ben Graham blur sigma at 512 px.")
    flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of the written images.")
    flags.DEFINE_float("dark_threshold", preprocessing.DARK_MEAN_THRESHOLD,
                       "Flag quality_too_dark below this mean luma (0-255) in the field.")
    flags.DEFINE_float("small_field_fraction", preprocessing.SMALL_FIELD_FRACTION,
                       "Flag quality_small_field below this field diameter / shorter side.")
    flags.DEFINE_float("small_field_pixels", preprocessing.SMALL_FIELD_PIXELS,
                       "... or below this field diameter in original pixels.")
    flags.DEFINE_string("split", "0.7,0.15,0.15", "train,val,test fractions.")
    flags.DEFINE_string("split_column", None, "Use this column's train/val/test instead.")
    flags.DEFINE_string("group_column", None, "Patient column for grouping (default patient_id).")
    flags.DEFINE_string("duplicates_csv", None, "Extra groups to keep together (group,image).")
    flags.DEFINE_integer("min_class_count", 0, "Drop classes/labels with fewer positives.")
    flags.DEFINE_string("balance", "none", "none | upsample (train split only).")
    flags.DEFINE_integer("num_shards", 0, "Total shards over all splits; 0: auto.")
    flags.DEFINE_integer("examples_per_shard", 1024, "Shard size when --num_shards=0.")
    flags.DEFINE_integer("workers", 0, "Decode/encode threads; 0: auto, min(CPUs, "
                         "available memory / 1.5 GiB).")
    flags.DEFINE_integer("seed", 0, "Seed of the split and the shard order.")
    flags.DEFINE_bool("overwrite", False, "Replace the output of a different plan in --out_dir.")


def _workers(flag: int) -> int:
    if flag:
        return flag
    workers = default_workers()
    logging.info("--workers=0: using %d worker threads (CPUs, available memory %s)",
                 workers, available_memory())
    return workers


def config_from_flags(f=flags.FLAGS) -> PrepareConfig:
    if f.label_column and f.label_columns:
        raise app.UsageError("--label_column and --label_columns are exclusive")
    if not f.labels_csv and f.source != "folders":
        raise app.UsageError("--labels_csv is required")
    if not f.out_dir:
        raise app.UsageError("--out_dir is required")
    columns = [f.label_column] if f.label_column else list(f.label_columns or [])
    return PrepareConfig(
            labels_csv=f.labels_csv or "", out_dir=f.out_dir, images_dir=f.images_dir,
            source=f.source, task=f.task, label_columns=tuple(columns),
            image_column=f.image_column,
            class_names=tuple(f.class_names) if f.class_names else None,
            positive_threshold=f.positive_threshold, label_map=f.label_map,
            image_size=f.image_size, crop=f.crop, modality=f.modality, clahe=f.clahe,
            ben_graham=f.ben_graham,
            ben_graham_sigma=f.ben_graham_sigma, jpeg_quality=f.jpeg_quality,
            dark_threshold=f.dark_threshold, small_field_fraction=f.small_field_fraction,
            small_field_pixels=f.small_field_pixels, split=f.split,
            split_column=f.split_column, group_column=f.group_column,
            duplicates_csv=f.duplicates_csv, min_class_count=f.min_class_count,
            balance=f.balance, num_shards=f.num_shards,
            examples_per_shard=f.examples_per_shard, workers=_workers(f.workers), seed=f.seed,
            overwrite=f.overwrite)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        summary = run(config_from_flags())
    except ValueError as e:
        # One line naming the flag, file or line at fault; no --help dump, no traceback.
        sys.exit(f"prepare: error: {e}")
    rows, timing = summary["rows"], summary["timing"]
    print(f"rows read {rows['read']}, written {rows['written']}, rejected {rows['rejected']} "
          f"(unknown label {rows['skipped_unknown_label']}); "
          f"{timing['images_per_second']} images/s over {timing['images_encoded']} images "
          f"({timing['write_seconds']} s encode+write, {timing['seconds']} s in all) "
          f"-> {flags.FLAGS.out_dir}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

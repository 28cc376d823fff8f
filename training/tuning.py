"""Grid search as a sweep over gin bindings (tune.py's logic).

    rows = sweep(gin_files, bindings, grid={"train.learning_rate": ["1e-2", "1e-3"],
                                            "train.batch_size": ["2", "4"]}, out_dir=D)

Every combination of the grid values (first parameter varies slowest) trains one run in
`D/trial_NNN/` with the base gin files and bindings plus the combination's bindings
(later bindings win). A trial is scored by its training summary's best monitored metric
(`train.monitor`, its mode: max for metrics, min for losses). Written to D:
  results.csv   trial, the grid parameters, monitor, best_metric, best_epoch, epochs_run,
                wall_time_s, status ("ok", "nan", or "error: ..."), workdir
  results.md    the same table, best first
  best.gin      the best trial's grid bindings: pass it after the base config
                (`train.py --gin_file=base.gin --gin_file=D/best.gin`)
A finished sweep re-run with the same grid reuses the finished trials (resume).
"""

import csv
import itertools
import math
import os

import gin
import keras
from absl import logging

from training import callbacks as cb
from training import experiment


def parse_grid(specs) -> dict[str, list[str]]:
    """["train.learning_rate=1e-2,1e-3", ...] -> {"train.learning_rate": ["1e-2", "1e-3"]}.

    Values stay gin literals (strings); raises ValueError naming a malformed spec.
    """
    grid = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name.strip() or not items:
            raise ValueError(f"--grid: expected 'configurable.param=v1,v2,...', got {spec!r}")
        if name.strip() in grid:
            raise ValueError(f"--grid: {name.strip()!r} given twice")
        grid[name.strip()] = items
    if not grid:
        raise ValueError("--grid: no parameter to search")
    return grid


def combinations(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, the first parameter varying slowest."""
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*grid.values())]


def _bindings(combo: dict[str, str]) -> list[str]:
    return [f"{k} = {v}" for k, v in combo.items()]


def run_trial(gin_files, bindings, combo: dict[str, str], workdir: str) -> dict:
    """Trains one combination (or reads its finished summary); returns its result row."""
    row = {**combo, "workdir": workdir}
    keras.backend.clear_session()  # the previous trial's graphs and names: memory stays flat
    gin.clear_config()
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings) + _bindings(combo))
    try:
        summary = experiment.train(workdir, resume=os.path.isdir(workdir))
    except (ValueError, FloatingPointError, RuntimeError) as e:  # one bad trial, not the sweep
        logging.warning("trial %s failed: %s", combo, e)
        return {**row, "status": f"error: {type(e).__name__}: {e}".splitlines()[0]}
    status = "nan" if summary["terminated_on_nan"] else "ok"
    return {**row, "status": status, "monitor": summary["monitor"], "mode": summary["mode"],
            "best_metric": summary["best_metric"], "best_epoch": summary["best_epoch"],
            "epochs_run": summary["epochs_run"], "wall_time_s": summary["wall_time_s"]}


def _rank_key(row: dict):
    """Sort key: usable trials first, best metric first (by the trial's mode)."""
    value = row.get("best_metric")
    if row.get("status") != "ok" or value is None or not math.isfinite(value):
        return (1, 0.0)
    return (0, -value if row["mode"] == "max" else value)


def sweep(gin_files, bindings, grid: dict[str, list[str]], out_dir: str) -> list[dict]:
    """Runs every combination; writes results.csv/.md and best.gin; returns rows, best first."""
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i, combo in enumerate(combinations(grid)):
        logging.info("trial %d: %s", i, combo)
        rows.append({"trial": i, **run_trial(gin_files, bindings, combo,
                                             os.path.join(out_dir, f"trial_{i:03d}"))})
    rows.sort(key=_rank_key)
    columns = ["trial", *grid, "monitor", "best_metric", "best_epoch", "epochs_run",
               "wall_time_s", "status", "workdir"]
    _write_csv(os.path.join(out_dir, "results.csv"), rows, columns)
    cb.write_text_atomic(os.path.join(out_dir, "results.md"), markdown_table(rows, columns))
    if _rank_key(rows[0])[0] == 0:
        best = rows[0]
        text = (f"# tune.py: best of {len(rows)} trials, {best['monitor']} = "
                f"{best['best_metric']:.4f} (trial {best['trial']})\n"
                + "".join(f"{b}\n" for b in _bindings({k: best[k] for k in grid})))
        cb.write_text_atomic(os.path.join(out_dir, "best.gin"), text)
    else:
        logging.error("no trial finished with a finite metric; no best.gin written")
    return rows


def _write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"

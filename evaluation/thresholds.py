"""thresholds.json, evaluate's record of the served decision, and the rules it holds.

The rules, their tuning and `apply_rule` live in `models.decision` (one definition, shared
with the training metrics and the export graph) and are re-exported here. What is
evaluation's own is the file: evaluate.py writes W/eval/thresholds.json

    {"task", "head", "class_names", "temperature", "decision": rule, "tta",
     "tuned_on": "val", "data_dir"}

and export.py bakes temperature, rule and TTA from it into the graph (`read_decision`).
"""

import json
import pathlib

from models.decision import (  # noqa: F401  (re-exports)
    GRID,
    apply_cutpoints,
    apply_rule,
    binary_rule,
    check_rule,
    default_rule,
    expected_grade,
    label_threshold,
    multilabel_rule,
    ordinal_rule,
    tune_rule,
)

THRESHOLDS_JSON = "thresholds.json"


def record(task: str, head: str, class_names, temperature, rule: dict, tta: bool,
           data_dir: str) -> dict:
    """The thresholds.json dict (module docstring), tuned on the val split of data_dir."""
    return {"task": task, "head": head, "temperature": temperature, "decision": rule,
            "tuned_on": "val", "data_dir": data_dir, "tta": bool(tta),
            "class_names": list(class_names)}


def read_decision(path, task: str, num_classes: int) -> tuple[dict, float | list[float], bool]:
    """(rule, temperature, tta) from thresholds.json, or the untuned defaults when absent.

    A bare rule ({"type": ...}) is accepted too. Temperature: a float, or a list of C
    floats (per-label multilabel calibration). tta: whether the rule was tuned on
    flip-averaged logits (the served graph then averages too).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return default_rule(task, num_classes), 1.0, False
    data = json.loads(path.read_text())
    rule = data if "type" in data else data.get("decision", data.get("rule"))
    check_rule(rule, task, num_classes, where=str(path))
    tta = bool(data.get("tta", False))
    temperature = data.get("temperature")
    if temperature is None:
        return rule, 1.0, tta
    if isinstance(temperature, list):
        return rule, [float(t) for t in temperature], tta
    return rule, float(temperature), tta

"""Ensemble of trained workdirs: the mean of their calibrated class probabilities.

    python -m evaluation.ensemble --workdirs=W1,W2,W3 --out_dir=E [--split=test] [--tta]

Each member W is predicted as evaluate.py predicts it (evaluation/run.py): logits of the
val split and of --split (optionally flip TTA), divided by W's own temperature fitted on
val. The ensemble's probabilities are the mean of the members' calibrated probabilities;
its decision rule is tuned on the mean validation probabilities with the single-model
tuner and applied unchanged to --split. Writes E/metrics.json (evaluation.metrics with
bootstrap CIs, plus members, temperatures, rule, tta, and each member's own headline
metrics) and E/predictions_<split>.csv.

Members must come from the same prepared data (same task, classes and labels in the same
order); otherwise ValueError naming the first member that differs.
"""

import json
import os
import pathlib
import sys

import numpy as np
from absl import app, flags

from evaluation import calibration, metrics, run, summary, thresholds
from models import decision


def member_probabilities(workdir: str, split: str, tta: bool) -> dict:
    """One member's predictions of val and `split`, calibrated on its val split.

    Returns:
        {"workdir", "task", "class_names", "temperature", "val": run.Predictions,
         "val_probs": float64 [N_val, K], "pred": run.Predictions, "probs": float64 [N, K]}.
    """
    from training import experiment

    model, info, config = experiment.build_from_config(workdir)
    data_dir = experiment.resolve_data_dir(workdir, config["data_dir"])
    head = config["head"]
    val = run.predict_split(model, data_dir, "val", config, info, tta)
    temperature = calibration.fit_temperature(val.logits, val.labels, head)
    pred = val if split == "val" else run.predict_split(model, data_dir, split, config, info,
                                                        tta)

    def probs(logits):
        return np.asarray(decision.calibrated_probabilities(logits, head, temperature),
                          np.float64)

    return {"workdir": workdir, "task": config["task"], "class_names": list(info["class_names"]),
            "temperature": temperature, "val": val, "val_probs": probs(val.logits),
            "pred": pred, "probs": probs(pred.logits)}


def check_members(members: list[dict]) -> None:
    """ValueError naming the first member whose task, classes or labels differ from the
    first member's (an ensemble averages predictions of the same images)."""
    ref = members[0]
    for m in members[1:]:
        for key in ("task", "class_names"):
            if m[key] != ref[key]:
                raise ValueError(f"{m['workdir']}: {key} {m[key]!r} differs from "
                                 f"{ref['workdir']}'s {ref[key]!r}")
        for part in ("val", "pred"):
            if not np.array_equal(m[part].labels, ref[part].labels):
                raise ValueError(f"{m['workdir']}: the labels of its {part} predictions differ "
                                 f"from {ref['workdir']}'s; train every member on the same "
                                 "prepared data")


def member_metrics(task: str, class_names, member: dict) -> dict:
    """A member alone, decided by the rule tuned on its own val probabilities: its
    headline metrics (no intervals), to set the ensemble beside its single models."""
    result, _ = combine(task, class_names, member["val"].labels, [member["val_probs"]],
                        member["pred"].labels, [member["probs"]], n_boot=0)
    return {name: result["metrics"][name] for name in result["headline"]}


def combine(task: str, class_names, val_labels, val_probs: list, labels, probs: list,
            patient_ids=None, n_boot: int = 1000, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Metrics of the mean probabilities, decided by a rule tuned on the mean val ones.

    Args:
        task, class_names: as `evaluation.metrics.compute_metrics`.
        val_labels: validation labels [N_val]; val_probs: one float [N_val, K] per member.
        labels: labels [N] of the evaluated split; probs: one float [N, K] per member.
        patient_ids, n_boot, seed: bootstrap, as `compute_metrics`.

    Returns:
        (compute_metrics' dict plus "decision": the tuned rule, mean probabilities [N, K]).
    """
    mean_val = np.mean(np.stack(val_probs), axis=0)
    mean = np.mean(np.stack(probs), axis=0)
    rule = thresholds.tune_rule(task, np.asarray(val_labels), mean_val, class_names)
    decisions = np.asarray(decision.apply_rule(rule, mean))
    result = metrics.compute_metrics(task, labels, mean, decisions, class_names, patient_ids,
                                     n_boot=n_boot, seed=seed)
    result["decision"] = rule
    return result, mean


def ensemble(workdirs: list[str], out_dir: str, split: str = "test", tta: bool = False,
             n_boot: int = 1000, seed: int = 0) -> dict:
    """Evaluates the ensemble of `workdirs` on `split`; writes out_dir/metrics.json and
    out_dir/predictions_<split>.csv; returns the metrics dict."""
    if len(workdirs) < 2:
        raise ValueError(f"An ensemble needs at least 2 workdirs, got {workdirs}")
    members = [member_probabilities(w, split, tta) for w in workdirs]
    check_members(members)
    first = members[0]
    task, names, pred = first["task"], first["class_names"], first["pred"]
    result, mean = combine(task, names, first["val"].labels, [m["val_probs"] for m in members],
                           pred.labels, [m["probs"] for m in members], pred.patient_ids,
                           n_boot, seed)
    result.update(split=split, tta=tta, members=list(workdirs),
                  temperatures=[m["temperature"] for m in members],
                  member_metrics=[member_metrics(task, names, m) for m in members],
                  decision_origin="tuned on the mean validation probabilities of the members")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    decisions = np.asarray(decision.apply_rule(result["decision"], mean))
    run.write_predictions_csv(out / f"predictions_{split}.csv", task, names, pred, mean,
                              decisions)
    return result


def summary_line(out_dir: str, result: dict) -> str:
    """"E | test n=400 | tta=False | 3 members | qwk 0.612 [0.551, 0.668] | ..."."""
    parts = [out_dir, f"{result['split']} n={result['num_examples']}", f"tta={result['tta']}",
             f"{len(result['members'])} members"]
    parts += [summary.format_metric(name, result["metrics"].get(name),
                                    result["confidence_intervals"].get(name))
              for name in result["headline"]]
    return " | ".join(parts)


FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "Comma-separated training workdirs (at least 2).")
flags.DEFINE_string("out_dir", None, "Where metrics.json and predictions_<split>.csv go.")
flags.DEFINE_string("split", "test", "Split to evaluate.")
flags.DEFINE_bool("tta", False, "Average each member's logits over the image and its flips.")
flags.DEFINE_integer("n_boot", 1000, "Bootstrap replicates for the 95% CIs (0: none).")


def main(argv):
    del argv
    try:
        result = ensemble(FLAGS.workdirs, FLAGS.out_dir, FLAGS.split, FLAGS.tta, FLAGS.n_boot)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(summary_line(os.path.normpath(FLAGS.out_dir), result))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdirs", "out_dir"])
    app.run(main)

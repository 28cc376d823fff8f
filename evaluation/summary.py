"""CLI: one line per evaluated workdir, the figures of the README's results tables.

    python -m evaluation.summary W [W ...] [--eval=eval]

For each workdir W, reads W/<eval>/metrics.json (evaluate.py) and
W/training_summary.json (train.py) and prints the headline metrics with their 95%
bootstrap intervals, the evaluated split and its size, TTA, and the training wall
time, e.g.

    W | test n=400 | tta=False | qwk 0.612 [0.55, 0.67] | ... | train 412 s (60 epochs)
"""

import json
import os
import sys


def format_metric(name: str, value, ci: dict | None) -> str:
    """"name 0.612 [0.551, 0.668]"; "name n/a" when undefined; interval only when known."""
    if value is None:
        return f"{name} n/a"
    text = f"{name} {value:.3f}"
    if ci and ci.get("low") is not None:
        text += f" [{ci['low']:.3f}, {ci['high']:.3f}]"
    return text


def summary_line(workdir: str, eval_name: str = "eval") -> str:
    """The one-line summary of `workdir` (see the module docstring)."""
    with open(os.path.join(workdir, eval_name, "metrics.json")) as f:
        m = json.load(f)
    parts = [workdir, f"{m.get('split', '?')} n={m['num_examples']}", f"tta={m.get('tta')}"]
    parts += [format_metric(name, m["metrics"].get(name), m["confidence_intervals"].get(name))
              for name in m["headline"]]
    train_path = os.path.join(workdir, "training_summary.json")
    if os.path.exists(train_path):
        with open(train_path) as f:
            t = json.load(f)
        parts.append(f"train {t['wall_time_s']:.0f} s ({t['epochs_run']} epochs, "
                     f"best {t['best_epoch']})")
    return " | ".join(parts)


def main(argv: list[str]) -> int:
    eval_name = "eval"
    workdirs = []
    for arg in argv:
        if arg.startswith("--eval="):
            eval_name = arg.split("=", 1)[1]
        else:
            workdirs.append(arg)
    if not workdirs:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for w in workdirs:
        print(summary_line(w, eval_name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

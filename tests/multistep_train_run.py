"""JAX-backend child of test_multistep.py: experiment.train, steps_per_execution 4 and 1.

argv: data_dir, a folder for the workdirs, then gin bindings. Prints a JSON line: {k:
{"summary": the training summary, "throughput": {"steps", "seconds"} of train's
Throughput callback, "calls": {"scan": n, "single": n} dispatches of multistep's jitted
functions}} for k "4" and "1". Both are counted by wrapping from here (`cb.Throughput`,
`multistep._compile`).
"""

import collections
import json
import os
import sys

import gin

from training import callbacks as cb
from training import experiment, multistep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
calls, meters = collections.Counter(), []
_compile, _throughput = multistep._compile, cb.Throughput


def _counting(fn, out_shardings):
    jitted = _compile(fn, out_shardings)
    name = "single" if fn.__name__ == "train_step" else "scan"

    def call(*args):
        calls[name] += 1
        return jitted(*args)

    return call


def _kept_throughput(*args, **kwargs):
    meters.append(_throughput(*args, **kwargs))
    return meters[-1]


def _train(data_dir: str, workdir: str, bindings: list) -> dict:
    calls.clear()
    meters.clear()
    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(REPO, "configs", "debug.gin")],
                                        [f"train.data_dir = '{data_dir}'", *bindings])
    summary = experiment.train(workdir)
    return {"summary": summary,
            "throughput": {"steps": meters[0].steps, "seconds": meters[0].seconds},
            "calls": {name: calls[name] for name in ("scan", "single")}}


if __name__ == "__main__":
    multistep._compile, cb.Throughput = _counting, _kept_throughput
    data_dir, workdir, *bindings = sys.argv[1:]
    print(json.dumps({k: _train(data_dir, os.path.join(workdir, k),
                                [*bindings, f"train.steps_per_execution = {k}"])
                      for k in ("4", "1")}))

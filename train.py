"""Trains a model from gin configs into a workdir.

    python train.py                                   # the demo (configs/demo.gin)
    python train.py --gin_file=configs/X.gin --gin_bindings='train.epochs=3' --workdir=W
    python train.py --gin_file=configs/X.gin --workdir=W --resume   # after a crash
    python train.py ... --coordinator_address=HOST:PORT --num_processes=P --process_id=I
                                                      # JAX, one process per machine

`--resume` refuses a config that differs from the one in W/config.gin (it names
each differing binding); `--resume_with_changes` continues anyway and records the
changes in W/config.gin, W/operative_config.gin and W/resume_log.json.

All settings are arguments of `training.experiment.train` (see its docstring) plus
`build_model.*`, `make_dataset.*` and `AugmentConfig.*`. gin imports and
configurables other than fundusflow's are refused (training/config.py).
"""

import errno
import os
import sys

from absl import app, flags, logging

from training import compilation  # no keras/TF import: cheap before flag parsing

FLAGS = flags.FLAGS
DEMO_GIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.gin")
flags.DEFINE_multi_string("gin_file", [], "Gin config files (default: configs/demo.gin).")
flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings, e.g. 'train.epochs = 3'.")
flags.DEFINE_string("workdir", "demo_run", "Output directory (see docs/ARCHITECTURE.md).")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its last finished epoch.")
flags.DEFINE_bool("resume_with_changes", False,
                  "Like --resume, but accept a config that differs from the workdir's "
                  "(the changes are recorded in the workdir).")
flags.DEFINE_string("coordinator_address", None,
                    "Several machines (JAX, train.distribution='multi_worker' or 'auto'): "
                    "host:port of process 0, the same on every process "
                    "(sets JAX_COORDINATOR_ADDRESS). TensorFlow reads TF_CONFIG instead.")
flags.DEFINE_integer("num_processes", None, "Processes in the job (sets JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process, 0..num_processes-1; 0 writes the "
                     "workdir (sets JAX_PROCESS_ID).")

flags.DEFINE_string("compilation_cache_dir", compilation.DEFAULT_DIR,
                    "JAX backend: persistent XLA compilation cache ('' turns it off); a "
                    "second start of the same run skips compiling.")


def _first_line(error: Exception) -> str:
    """The message without the "In call to configurable 'train'" line gin appends."""
    return str(error).splitlines()[0]


def _errno(error: OSError) -> int | None:
    """errno, also through gin's proxy of an error raised inside `train` (errno None, the
    original in __context__)."""
    if error.errno is None and isinstance(error.__context__, OSError):
        return error.__context__.errno
    return error.errno


def _export_cluster_flags():
    """--coordinator_address/--num_processes/--process_id -> the JAX_* variables that
    training/distribution.py reads (flags win over the environment)."""
    for name, value in (("JAX_COORDINATOR_ADDRESS", FLAGS.coordinator_address),
                        ("JAX_NUM_PROCESSES", FLAGS.num_processes),
                        ("JAX_PROCESS_ID", FLAGS.process_id)):
        if value is not None:
            os.environ[name] = str(value)


def main(argv):
    del argv
    from input_pipeline.integrity import CorruptShardError
    from training import config, experiment

    compilation.enable_compilation_cache(FLAGS.compilation_cache_dir)
    _export_cluster_flags()
    try:
        config.parse(FLAGS.gin_file or [DEMO_GIN], FLAGS.gin_bindings)
    except ValueError as e:  # unknown configurable or parameter, syntax, unsafe import
        sys.exit(f"error: {e}")
    try:
        summary = experiment.train(FLAGS.workdir,
                                   resume=FLAGS.resume or FLAGS.resume_with_changes,
                                   allow_changes=FLAGS.resume_with_changes)
    except (FileNotFoundError, FileExistsError, CorruptShardError, experiment.ConfigError,
            experiment.PlanChangedError) as e:
        sys.exit(f"error: {_first_line(e)}")
    except OSError as e:
        if _errno(e) not in (errno.ENOSPC, errno.EDQUOT):
            raise
        sys.exit(f"error: {_first_line(e)}. The last checkpoints are intact: free space, "
                 "then rerun with --resume.")
    logging.info("best %s = %s at epoch %s; %.1f s, %.1f images/s", summary["monitor"],
                 summary["best_metric"], summary["best_epoch"], summary["wall_time_s"],
                 summary["images_per_s"])
    if summary["terminated_on_nan"]:
        sys.exit(f"error: training stopped on a NaN/inf loss after {summary['epochs_run']} "
                 f"epochs; {FLAGS.workdir}/model.keras and checkpoints/best.weights.h5 hold "
                 "the last good weights and backup/ the last good epoch (e.g. lower "
                 "train.learning_rate or set train.clipnorm, then --resume_with_changes).")


if __name__ == "__main__":
    app.run(main)

"""Runs train.py with one fault injected from the outside (the code under test is unchanged).

    python tests/reliability/inject.py FAULT -- train.py --gin_file=... --workdir=W

FAULT is one of
  kill_at_batch:E:B   SIGKILL itself at batch B (0-based) of epoch E (0-based): a
                      kill -9 in the middle of an epoch.
  kill_in_save:S:N    at the N-th (1-based) weights file written whose path contains S
                      ("/best.", "/backup/", "/checkpoints/epoch_"; every weights save
                      goes through keras' saving_lib.save_weights_only), write the file,
                      cut it to half its size and SIGKILL itself: a kill -9 in the middle
                      of a checkpoint write.
  enospc_in_save:S:N  the same write is cut to half and raises OSError(ENOSPC), as a
                      full disk would.
  nan_after_epoch:E   after epoch E (0-based) ends, set every trainable weight to NaN,
                      so the next epoch's loss is NaN.
  none                no fault (handy for the same command line without one).

Patches are installed on keras (Model.fit gets one more callback; saving_lib's
save_weights_only is wrapped), then train.py runs as __main__.
"""

import errno
import os
import runpy
import signal
import sys


def _kill_self():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _add_callback(callback_factory):
    """Every Model.fit call gets `callback_factory()` appended to its callbacks (runs last)."""
    import keras

    fit = keras.Model.fit

    def fit_with_fault(self, *args, **kwargs):
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [callback_factory()]
        return fit(self, *args, **kwargs)

    keras.Model.fit = fit_with_fault


def _kill_at_batch(epoch: int, batch: int):
    import keras

    class KillAt(keras.callbacks.Callback):
        def on_epoch_begin(self, e, logs=None):
            self.epoch = e

        def on_train_batch_end(self, b, logs=None):
            if self.epoch == epoch and b == batch:
                _kill_self()

    _add_callback(KillAt)


def _nan_after_epoch(epoch: int):
    import keras
    import numpy as np

    class PoisonWeights(keras.callbacks.Callback):
        def on_epoch_end(self, e, logs=None):
            if e == epoch:
                for v in self.model.trainable_variables:
                    v.assign(np.full(v.shape, np.nan, v.dtype))

    _add_callback(PoisonWeights)


def _fault_in_save(part: str, n: int, action: str):
    """Wraps saving_lib.save_weights_only: the n-th write to a path containing `part`
    writes half a file, then `action` ("kill" or "enospc")."""
    from keras.src.saving import saving_lib

    save = saving_lib.save_weights_only
    calls = [0]

    def save_with_fault(model, filepath, *args, **kwargs):
        calls[0] += part in str(filepath)
        if part not in str(filepath) or calls[0] != n:
            return save(model, filepath, *args, **kwargs)
        save(model, filepath, *args, **kwargs)
        with open(filepath, "r+b") as f:
            f.truncate(os.path.getsize(filepath) // 2)
        print(f"inject: {action} while writing {filepath}", file=sys.stderr, flush=True)
        if action == "kill":
            _kill_self()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filepath)

    saving_lib.save_weights_only = save_with_fault


def install(fault: str) -> None:
    kind, *args = fault.rsplit(":", 2) if "_in_save" in fault else fault.split(":")
    if kind == "kill_at_batch":
        _kill_at_batch(int(args[0]), int(args[1]))
    elif kind in ("kill_in_save", "enospc_in_save"):
        _fault_in_save(args[0], int(args[1]), kind.split("_")[0])
    elif kind == "nan_after_epoch":
        _nan_after_epoch(int(args[0]))
    elif kind != "none":
        raise SystemExit(f"inject: unknown fault {fault!r}")


def main(argv):
    if len(argv) < 4 or argv[2] != "--":
        raise SystemExit(__doc__)
    fault, script = argv[1], argv[3]
    install(fault)
    sys.argv = [script, *argv[4:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)

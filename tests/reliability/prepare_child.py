"""prepare's CLI with a fault point, for kill -9 tests (the fault comes from the test side).

    python -m tests.reliability.prepare_child KIND N MARKER [prepare flags...]

Runs `input_pipeline.prepare` exactly as its CLI does, except that the N-th call
(1-based) of one function first touches MARKER and then hangs, so that the parent
can SIGKILL the process at that point and nowhere else:

    image    preprocessing.process_image (reading / decoding one image; --workers=1)
    record   features.serialize_example (a shard's partial file is open and being written)
    sidecar  writing .state/<shard>.json (the shard was renamed into place, its
             sidecar not yet written: the narrowest window of a resume)
    none     no fault (an uninterrupted run)
"""

import os
import signal
import subprocess
import sys
import time

from absl import app

from input_pipeline import features, prepare, preprocessing

KINDS = ("image", "record", "sidecar", "none")


def _hang_at(n: int, marker: str, fn, when=lambda *a, **k: True):
    """`fn` wrapped: its n-th call for which `when(...)` holds touches `marker` and hangs."""
    calls = [0]

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                open(marker, "w").close()
                time.sleep(3600)
        return fn(*args, **kwargs)

    return wrapper


def install(kind: str, n: int, marker: str) -> None:
    """Patches the function `kind` names (module attributes, looked up at call time)."""
    if kind == "image":
        preprocessing.process_image = _hang_at(n, marker, preprocessing.process_image)
    elif kind == "record":
        features.serialize_example = _hang_at(n, marker, features.serialize_example)
    elif kind == "sidecar":
        sidecar = lambda path, obj: f"{os.sep}{prepare.STATE_DIR}{os.sep}" in path and \
            not path.endswith("plan.json")  # noqa: E731
        prepare._write_json = _hang_at(n, marker, prepare._write_json, sidecar)
    elif kind != "none":
        raise SystemExit(f"unknown fault kind {kind!r}; known: {KINDS}")


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def kill_at(kind: str, n: int, flags: list[str], marker: str, timeout: float = 300) -> str:
    """Runs the child, SIGKILLs it once it reaches the fault point; returns "killed",
    or "finished" when it ended first (fewer than n calls). Raises RuntimeError with
    the child's stderr tail when it failed."""
    cmd = [sys.executable, "-m", "tests.reliability.prepare_child", kind, str(n), marker,
           *flags]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    log_path = marker + ".log"  # a file, not a pipe: a full pipe would stall the child
    with open(log_path, "wb") as log:
        # Own session: after the fault (SIGKILL of prepare itself), the group kill
        # below also ends its orphaned pool workers.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(marker) and proc.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"prepare reached no fault point in {timeout} s")
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            _kill_group(proc.pid)
            return "killed"
        if proc.returncode != 0:
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f.read()[-2000:])
        return "finished"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        _kill_group(proc.pid)


def _kill_group(pgid: int) -> None:
    """SIGKILLs what is left of the child's process group (its pool workers)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":
    kind, n, marker, *flags_argv = sys.argv[1:]
    install(kind, int(n), marker)
    prepare.define_flags()
    app.run(prepare.main, argv=[sys.argv[0], *flags_argv])

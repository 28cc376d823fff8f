"""Running a check on the JAX backend from a TensorFlow-backed test session: a child
process (the backend is fixed at import), on CPU."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_on_jax(call: str, timeout: int = 300) -> None:
    """Runs the Python statement `call` (e.g. "from tests.m import f; f()") with
    KERAS_BACKEND=jax and fails the test with the child's stderr unless it completes."""
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", f"{call}; print('ok')"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


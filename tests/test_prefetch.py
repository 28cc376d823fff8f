"""training/prefetch.py: batches read ahead on a thread, same batches in the same order."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from training import prefetch, train_function

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ahead_yields_the_source_in_order_then_stops_for_good():
    ahead = prefetch._Ahead(iter(range(7)), depth=2)
    assert list(ahead) == list(range(7))
    with pytest.raises(StopIteration):
        next(ahead)
    ahead.close()


def test_ahead_reraises_the_source_error_on_the_reading_thread():
    def source():
        yield 1
        raise OSError("shard unreadable")

    ahead = prefetch._Ahead(source(), depth=2)
    assert next(ahead) == 1
    with pytest.raises(OSError, match="shard unreadable"):
        next(ahead)
    ahead.close()


def test_close_stops_a_thread_blocked_on_a_full_queue():
    ahead = prefetch._Ahead(iter(range(10**9)), depth=1)
    assert next(ahead) == 0
    ahead.close()
    assert not ahead._thread.is_alive()


def test_resolve_is_off_on_tensorflow_and_checks_the_depth(monkeypatch):
    assert prefetch.resolve(None) == 0  # tests run on the TF backend
    assert prefetch.resolve(3) == 3
    with pytest.raises(ValueError, match="device_prefetch"):
        prefetch.resolve(-1)
    monkeypatch.setattr(train_function, "one_jax_accelerator", lambda: True)
    assert prefetch.resolve(None) == 2  # two executions' worth on one accelerator
    assert prefetch.resolve(None, 8) == 16
    assert prefetch.resolve(0, 8) == 0


@pytest.mark.parametrize("steps_per_epoch,devices", [(5, 1), (0, 1), (5, 2)],
                         ids=["kept_iterator", "one_pass", "data_parallel"])
def test_jax_fit_with_prefetch_trains_what_fit_without_trains(steps_per_epoch, devices):
    """3 epochs of 5 steps over 7 distinct batches (batches read ahead at an epoch's end
    belong to the next epoch), or of one pass (the thread meets the end of the data):
    the same weights, so the same batches in the same order. Also under DataParallel
    over 2 devices, whose state shardings fit decides."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-m", "tests.prefetch_run", str(steps_per_epoch)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    if devices > 1:  # else the thread's batches land whole on one device
        assert runs.pop("thread_sees_distribution") is True
    for w0, w2 in zip(runs["0"], runs["2"], strict=True):
        # (float noise only: a batch out of order moves these weights by ~1e-2)
        np.testing.assert_allclose(np.array(w2), np.array(w0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.array(runs["0"][0]), 0)

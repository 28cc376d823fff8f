"""The quick reliability suite (`make reliability` runs the full one), and its runner."""

import pytest

from tests.reliability import Result
from tests.reliability import run as runner

# Training under kill -9, ENOSPC, NaN and the determinism pair cost minutes here; their
# failures have fast unit tests in test_train_reliability.py / test_train.py, and
# `make reliability` (or make test-all) runs these scenarios too.
LONG = {"train_kill_mid_epoch", "train_kill_during_checkpoint_write",
        "train_full_disk_during_checkpoint", "train_nan_loss", "train_deterministic",
        "train_missing_workdir_files"}


def _quick_suite() -> list:
    return [pytest.param(s, marks=pytest.mark.long) if s.__name__ in LONG else s
            for s in runner.discover()]


@pytest.mark.parametrize("scenario", _quick_suite(), ids=lambda s: s.__name__)
def test_scenario_quick(scenario):
    result, seconds = runner.run_scenario(scenario, quick=True)
    print(runner.format_table([(result, seconds)]))
    assert result.ok, result.detail
    assert result.runs_survived > 0  # (a determinism check injects no fault)


def _lossy(tmp, quick):
    return Result("lossy", faults_injected=1, runs_survived=0, records_lost=2)


def _crashing(tmp, quick):
    raise OSError("disk on fire")


def _fine(tmp, quick):
    assert tmp.is_dir() and quick is False
    return Result("fine", faults_injected=2, runs_survived=2)


def test_runner_fails_on_loss_or_crash_and_prints_the_table(monkeypatch, capsys):
    monkeypatch.setattr(runner, "discover", lambda: [_fine, _lossy, _crashing])
    assert runner.main([]) == 1
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["scenario", "faults", "injected", "runs", "survived",
                                "records", "lost", "unexpected", "crashes", "seconds", "detail"]
    assert table[2].split()[:5] == ["fine", "2", "2", "0", "0"]
    assert table[3].split()[:5] == ["lossy", "1", "0", "2", "0"]
    assert table[4].split()[:5] == ["_crashing", "0", "0", "0", "1"]
    assert table[4].endswith("crashed: OSError: disk on fire")
    assert table[5] == "FAILED: lossy, _crashing"
    monkeypatch.setattr(runner, "discover", lambda: [_fine])
    assert runner.main(["-k", "fine"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("OK: 1 scenarios")
    assert runner.main(["-k", "nothing matches"]) == 1  # an empty suite passes nothing

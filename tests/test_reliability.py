"""The quick reliability suite (`make reliability` runs the full one), and its runner."""

import pytest

from tests.reliability import Result
from tests.reliability import run as runner


@pytest.mark.parametrize("scenario", runner.discover(), ids=lambda s: s.__name__)
def test_scenario_quick(scenario):
    result, seconds = runner.run_scenario(scenario, quick=True)
    print(runner.format_table([(result, seconds)]))
    assert result.ok, result.detail
    assert result.faults_injected > 0 and result.runs_survived > 0


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

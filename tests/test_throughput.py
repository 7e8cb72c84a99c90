"""benchmarks/throughput.py: the steady-state rate of several workers and where their time goes."""

import importlib.util
import os
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # throughput.py imports trials.py beside it
spec = importlib.util.spec_from_file_location("throughput", BENCHMARKS / "throughput.py")
throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(throughput)
sys.path.remove(str(BENCHMARKS))

T0 = datetime(2026, 12, 3, 8, 0, 0)


def trial(number: int, worker: str, start: float, end: float, refusals: float) -> optuna.trial.FrozenTrial:
    return optuna.trial.FrozenTrial(
        number=number,
        state=optuna.trial.TrialState.COMPLETE,
        value=None,
        values=[0.0, 0.0],
        datetime_start=T0 + timedelta(seconds=start),
        datetime_complete=T0 + timedelta(seconds=end),
        params={},
        distributions={},
        user_attrs={"worker": worker, "seconds": {"refusals": refusals}},
        system_attrs={},
        intermediate_values={},
        trial_id=number,
    )


def test_two_workers_rate_their_steady_state_and_show_the_time_between_their_trials():
    # Worker a: trials of 1 s with 1 s between them, from t=0; worker b starts late (it loaded).
    finished = [trial(i, "a", 2 * i, 2 * i + 1, 0.75) for i in range(6)]
    finished += [trial(6 + i, "b", 5 + 2 * i, 6 + 2 * i, 0.75) for i in range(3)]
    result = throughput.measure(finished, workers=2)
    assert result["trials"] == 9 and result["workers_with_trials"] == 2
    # Steady state from b's first end (6 s) to the first last end (b's, 10 s): a ends at 7 and 9,
    # b at 8 and 10: 4 trials in 4 s.
    assert result["per_hour"] == pytest.approx(3600.0)
    assert result["median_s"] == {"refusals": 0.75, "rest": 0.25, "between": 1.0}
    assert result["mean_s"]["between"] == pytest.approx(1.0)


def test_a_worker_that_never_finished_a_trial_leaves_no_steady_state():
    finished = [trial(i, "a", 2 * i, 2 * i + 1, 0.5) for i in range(3)]
    result = throughput.measure(finished, workers=2)
    assert result["per_hour"] is None and result["workers_with_trials"] == 1


def test_the_long_trials_are_counted_and_the_timeline_keeps_every_trial():
    # Four trials of 1 s and one of 5 s, one worker.
    finished = [trial(i, "a", 2 * i, 2 * i + 1, 0.5) for i in range(4)] + [trial(4, "a", 8, 13, 4.5)]
    result = throughput.measure(finished, workers=1)
    assert result["trial_s"] == {"median": 1.0, "p90": 1.0, "max": 5.0, "share_over_2x_median": 0.2}
    rows = throughput.timeline(list(reversed(finished)))
    assert [row["number"] for row in rows] == [0, 1, 2, 3, 4]
    assert rows[4] == {"number": 4, "worker": "a", "start": 8.0, "end": 13.0, "seconds": {"refusals": 4.5}}


def test_the_gpu_is_busy_as_nvidia_smi_says_within_the_steady_state():
    output = "2026/12/03 08:00:04.000, 10\n2026/12/03 08:00:07.500, 90\n2026/12/03 08:00:09.000, 70\n"
    output += "2026/12/03 08:00:30.000, 0\nnot a sample\n"
    samples = throughput.parse_utilization(output)
    assert samples[1] == (T0 + timedelta(seconds=7.5), 90.0) and len(samples) == 4
    # The steady state of the two-worker study above runs from 6 s to 10 s: two samples within.
    finished = [trial(i, "a", 2 * i, 2 * i + 1, 0.75) for i in range(6)]
    finished += [trial(6 + i, "b", 5 + 2 * i, 6 + 2 * i, 0.75) for i in range(3)]
    assert throughput.measure(finished, workers=2, utilization=samples)["gpu_busy"] == 80.0
    assert throughput.measure(finished, workers=2)["gpu_busy"] is None


def test_gpu_busy_reads_what_nvidia_smi_prints_while_the_block_runs(tmp_path, monkeypatch):
    # A stand-in nvidia-smi that prints two samples and waits to be stopped, as the real one does with -lms.
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\necho '2026/12/03 08:00:01.000, 40'\necho '2026/12/03 08:00:01.100, 60'\nexec sleep 30\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with throughput.GpuBusy() as busy:
        time.sleep(0.5)
    assert busy.samples == [(T0 + timedelta(seconds=1), 40.0), (T0 + timedelta(seconds=1.1), 60.0)]


def test_gpu_busy_has_no_samples_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with throughput.GpuBusy() as busy:
        pass
    assert busy.samples == []

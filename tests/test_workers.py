"""Several workers share one study through its storage: exactly n trials, none lost or counted twice."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from abliterate.cli import main
from abliterate.storage import open_storage

pytestmark = pytest.mark.slow

N_TRIALS = 12
POSTGRES = os.environ.get("ABLITERATE_TEST_POSTGRES_URL")


@pytest.fixture
def model(tiny_model_folder: Path) -> Path:
    return tiny_model_folder


@pytest.fixture(params=["journal", "sqlite", "postgresql"])
def storage(request, tmp_path: Path) -> str:
    if request.param == "journal":  # the default: a journal file in the output folder
        return f"journal:{tmp_path / 'shared.journal'}"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    if not POSTGRES:
        pytest.skip(
            "no PostgreSQL server: set ABLITERATE_TEST_POSTGRES_URL (make test starts one where it can)"
        )
    return POSTGRES


def worker_command(model: Path, storage: str, study: str, output: Path) -> list[str]:
    return [
        sys.executable, "-m", "abliterate", "--model", str(model), "--storage", storage, "--study-name", study,
        "--output", str(output), "--n-trials", str(N_TRIALS), "--n-startup-trials", "4", "--select", "none",
        "--max-response-length", "12", "--harmful-train-split", "train[:16]", "--harmless-train-split", "train[:16]",
        "--harmful-eval-split", "eval[:12]", "--harmless-eval-split", "eval[:12]",
    ]  # fmt: skip


def start_workers(
    model: Path, storage: str, study: str, tmp_path: Path, count: int = 3
) -> list[subprocess.Popen]:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return [
        subprocess.Popen(
            worker_command(model, storage, study, tmp_path / f"worker-{index}"),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=environment,
        )
        for index in range(count)
    ]


def trials_of(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=open_storage(storage)).get_trials(deepcopy=False)


def directions_digest(stderr: str) -> str:
    return re.search(r"refusal directions: \d+ layers, sha256 (\w+)", stderr).group(1)


def test_three_workers_finish_exactly_n_trials_with_the_same_directions(model, storage, tmp_path):
    study = f"shared-{uuid.uuid4().hex[:8]}"
    workers = start_workers(model, storage, study, tmp_path)
    errors = [worker.communicate(timeout=600)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0], "\n".join(e[-3000:] for e in errors)
    trials = trials_of(storage, study)
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    assert len(complete) == N_TRIALS
    assert len({trial.number for trial in trials}) == len(trials)
    assert all(trial.state in (TrialState.COMPLETE, TrialState.PRUNED) for trial in trials)
    assert len({trial.user_attrs["worker"] for trial in complete}) >= 2, "the trials were not shared"
    assert len({directions_digest(error) for error in errors}) == 1, "workers disagree on the directions"


def test_a_killed_worker_loses_its_trial_and_the_others_finish(model, storage, tmp_path):
    study = f"killed-{uuid.uuid4().hex[:8]}"
    workers = start_workers(model, storage, study, tmp_path)
    victim = workers[0]
    for line in victim.stderr:
        if re.match(r"trial +\d+:", line):
            break
    # Killed while a trial of its own is being evaluated (the worker's mark is its first write).
    mark = f"{socket.gethostname()}:{victim.pid}:"  # then the process's start time
    # Opened once and only read: a stopped victim may hold the journal's lock, which opening takes.
    opened = open_storage(storage)

    def victims_running_trial() -> int | None:
        trials = optuna.load_study(study_name=study, storage=opened).get_trials(deepcopy=False)
        running = (t for t in trials if t.state == TrialState.RUNNING)
        return next((t.number for t in running if str(t.user_attrs.get("worker")).startswith(mark)), None)

    while True:
        assert victim.poll() is None, "the worker ended before it could be killed mid-trial"
        number = victims_running_trial()
        if number is None:
            time.sleep(0.005)
            continue
        victim.send_signal(signal.SIGSTOP)  # frozen: its trial cannot end between this look and the kill
        if victims_running_trial() == number:
            break
        victim.send_signal(signal.SIGCONT)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    errors = [worker.communicate(timeout=600)[1] for worker in workers[1:]]
    assert [worker.returncode for worker in workers[1:]] == [0, 0], errors
    trials = trials_of(storage, study)
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    assert len(complete) == N_TRIALS
    # The trial it had in flight was marked failed (by the heartbeat, or in a journal by its process
    # id once the others reached the last slots), and never counted.
    assert next(trial for trial in trials if trial.number == number).state == TrialState.FAIL
    unfinished = [trial for trial in trials if trial.state != TrialState.COMPLETE]
    assert all(trial.state in (TrialState.FAIL, TrialState.PRUNED) for trial in unfinished)


def test_workers_flag_runs_them_and_saves_the_result(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out"
    argv = worker_command(model, f"sqlite:///{tmp_path / 'w.db'}", "flag", output)[3:]
    argv += ["--workers", "2", "--select", "knee"]
    assert main(argv) == 0
    complete = [
        t for t in trials_of(f"sqlite:///{tmp_path / 'w.db'}", "flag") if t.state == TrialState.COMPLETE
    ]
    assert len(complete) == N_TRIALS
    assert (output / "model" / "model.safetensors").is_file()

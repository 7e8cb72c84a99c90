"""The study: objectives, storage, start-up and warm-start trials, and choosing a trial."""

import contextlib
import fcntl
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta

import optuna
import psutil
import pytest
import torch
from optuna.trial import TrialState
from sqlalchemy.exc import ProgrammingError

from abliterate.errors import UserError
from abliterate.evaluate import NumericalFault
from abliterate.judge import RefusalCount
from abliterate.select import finished_trial, knee, pareto_front, select_trial
from abliterate.settings import Selection
from abliterate.space import SearchSpace
from abliterate.storage import (
    StudyData,
    drop_cut_last_line,
    fail_stale_trials,
    folder_holds_study,
    folder_storage_url,
    journal_lock,
    open_storage,
    process_identity,
)
from abliterate.study import (
    MAX_CONSECUTIVE_FAILURES,
    Objective,
    open_study,
    pin_scoring,
    plan_warm_starts,
    run_study,
    startup_trials,
    startup_trials_in_time,
)


def finished_study(points):
    study = optuna.create_study(directions=["minimize", "minimize"])
    for refusals, kl in points:
        study.add_trial(optuna.trial.create_trial(values=[refusals, kl], params={}, distributions={}))
    return study


def test_selection():
    study = finished_study([(10, 0.01), (0, 2.0), (2, 0.1), (5, 0.05), (8, 0.5)])
    assert select_trial(study, Selection.parse("min-refusals")).number == 1
    assert select_trial(study, Selection.parse("min-kl")).number == 0
    assert select_trial(study, Selection.parse("trial:4")).number == 4
    assert select_trial(study, Selection.parse("knee")).number == 2
    assert select_trial(study, Selection.parse("max-kl:0.1")).number == 2
    assert select_trial(study, Selection.parse("max-kl:0.07")).number == 3
    assert select_trial(study, Selection.parse("max-kl:5")).number == 1
    assert select_trial(study, Selection.parse("none")) is None
    with pytest.raises(
        UserError,
        match=r"no finished trial 9 \(it does not exist; 5 finished; on the Pareto front: 1, 2, 3, 0\)",
    ):
        select_trial(study, Selection.parse("trial:9"))
    with pytest.raises(UserError, match=r"no finished trial has KL <= 0.001 \(the lowest is 0.0100\)"):
        select_trial(study, Selection.parse("max-kl:0.001"))


def test_a_trial_that_did_not_finish_cannot_be_selected_and_the_error_says_why():
    study = finished_study([(3, 0.2)])
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    with pytest.raises(
        UserError,
        match=r"^--select trial:1: the study has no finished trial 1 \(it failed; 1 finished; on the Pareto front: 0\)$",
    ):
        finished_trial(study, 1)
    assert finished_trial(study, 0).number == 0


def test_select_values_are_parsed_once_and_print_as_given():
    assert Selection.parse("max-kl:0.50") == Selection("max-kl", 0.5)
    assert str(Selection.parse("max-kl:0.50")) == "max-kl:0.5"
    assert Selection.parse("trial:12").trial_number == 12
    assert str(Selection.parse("knee")) == "knee"


def test_knee_is_the_trial_farthest_below_the_line_between_the_fronts_ends():
    # The front of a demo run (README): the corner-nearest trial would be 23/100 at KL 0.083; the
    # knee is where removing more refusals starts to cost much more KL.
    front = [(2, 0.1404), (4, 0.1146), (8, 0.0939), (13, 0.0912), (23, 0.0828), (44, 0.0700), (85, 0.0247)]
    assert select_trial(finished_study(front), Selection.parse("knee")).values == [8, 0.0939]
    # On a straight front every trial is as far from the line; fewer refusals win.
    assert select_trial(finished_study([(0, 0.3), (5, 0.2), (10, 0.1)]), Selection("knee")).values[0] == 0


def test_knee_of_a_single_trial():
    study = finished_study([(3, 0.2)])
    assert knee(study.best_trials).number == 0


class FakeEditor:
    name = "fake"

    def __init__(self):
        self.applied = 0
        self.resets = 0

    def apply(self, edits, row_norm="none"):
        self.applied += 1

    def reset(self):
        self.resets += 1


class FakeEvaluator:
    """Scores from a list; `None` stands for a NaN fault."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.current = None

    def kl(self):
        self.current = self.outcomes.pop(0)
        if self.current is None:
            raise NumericalFault("KL divergence is nan")
        return self.current[1]

    def refusals(self):
        return RefusalCount(total=self.current[0], markers=self.current[0])


def objective_with(outcomes) -> tuple[Objective, FakeEditor]:
    editor = FakeEditor()
    directions = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    return Objective(editor, FakeEvaluator(outcomes), directions, SearchSpace(4), "none"), editor


def test_a_numerical_fault_fails_one_trial_and_the_study_goes_on():
    study = optuna.create_study(directions=["minimize", "minimize"])
    objective, editor = objective_with([(5, 0.1), None, (3, 0.2), (2, 0.4)])
    run_study(study, objective, n_trials=3)
    states = [trial.state for trial in study.trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1
    failed = next(trial for trial in study.trials if trial.state == TrialState.FAIL)
    assert failed.user_attrs["fail_reason"] == "KL divergence is nan"
    assert editor.resets == editor.applied == 4  # the failed trial was reset too


def test_many_failures_in_a_row_stop_with_a_clear_message():
    study = optuna.create_study(directions=["minimize", "minimize"])
    objective, _ = objective_with([None] * MAX_CONSECUTIVE_FAILURES)
    with pytest.raises(
        UserError, match=f"{MAX_CONSECUTIVE_FAILURES} trials in a row failed \\(KL divergence is nan\\)"
    ):
        run_study(study, objective, n_trials=5)


def test_trials_store_their_metrics():
    study = optuna.create_study(directions=["minimize", "minimize"])
    objective, _ = objective_with([(7, 0.25)])
    run_study(study, objective, n_trials=1)
    (trial,) = study.trials
    assert trial.values == [7, 0.25]
    assert trial.user_attrs["refusals"] == 7 and trial.user_attrs["kl"] == 0.25
    assert trial.user_attrs["edited_layers"]
    assert set(trial.user_attrs["seconds"]) == {"edit", "kl", "refusals", "reset"}


class RacingSchema:
    """Stands in for the SQL storage: fails like a worker that lost the race to create the schema."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls = 0

    def __call__(self, url, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise ProgrammingError("CREATE TABLE studies", {}, Exception('relation "studies" already exists'))
        return optuna.storages.InMemoryStorage()


def test_a_worker_that_loses_the_schema_race_retries(monkeypatch):
    monkeypatch.setattr("abliterate.study.time.sleep", lambda seconds: None)
    racing = RacingSchema(failures=2)
    monkeypatch.setattr("abliterate.storage.HeartbeatStorage", racing)
    assert isinstance(open_storage("postgresql+psycopg://db/study"), optuna.storages.InMemoryStorage)
    assert racing.calls == 3


def test_a_database_that_keeps_failing_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("abliterate.study.time.sleep", lambda seconds: None)
    racing = RacingSchema(failures=100)
    monkeypatch.setattr("abliterate.storage.HeartbeatStorage", racing)
    with pytest.raises(
        UserError, match=r"cannot open storage 'postgresql\+psycopg://db/study': .*already exists"
    ):
        open_storage("postgresql+psycopg://db/study", attempts=3)
    assert racing.calls == 3


def test_an_sqlite_study_writes_ahead_and_a_missing_folder_is_still_one_clear_error(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    optuna.create_study(storage=storage, study_name="s").ask()
    with contextlib.closing(sqlite3.connect(tmp_path / "study.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with pytest.raises(
        UserError, match=r"cannot open storage 'sqlite:///.*/missing/study.db': .*unable to open"
    ):
        open_storage(f"sqlite:///{tmp_path / 'missing' / 'study.db'}", attempts=1)
    assert not (tmp_path / "missing").exists()


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed(tmp_path, monkeypatch):
    # study.ask() creates a running trial without the heartbeat thread that optimize() starts:
    # exactly what a worker killed between the two leaves behind.
    storage = open_storage(f"sqlite:///{tmp_path / 'db'}")
    study = optuna.create_study(storage=storage, directions=["minimize"] * 2)
    orphan, beating = study.ask(), study.ask()
    storage.record_heartbeat(beating._trial_id)
    fail_stale_trials(study)
    assert storage.get_trial(orphan._trial_id).state == TrialState.RUNNING, "failed within the grace period"

    # The database's clock has whole seconds: beat again just after one begins, so that the check
    # below runs within the same second (a heartbeat one tick old is stale under a grace of 0).
    time.sleep(1.02 - time.time() % 1)
    storage.record_heartbeat(beating._trial_id)
    monkeypatch.setattr(storage, "grace_period", 0)
    time.sleep(0.01)
    fail_stale_trials(study)
    assert storage.get_trial(orphan._trial_id).state == TrialState.FAIL
    # A heartbeat is stale only once older than the grace period, by the database's clock (whole
    # seconds in SQLite): this fresh one is not yet.
    assert storage.get_trial(beating._trial_id).state == TrialState.RUNNING


def test_a_trial_stamped_by_a_clock_hours_behind_is_not_failed_before_its_heartbeat_is_due(tmp_path):
    # A worker on a host whose local time is three hours behind ours has just made this trial.
    storage = open_storage(f"sqlite:///{tmp_path / 'db'}")
    study = optuna.create_study(storage=storage, directions=["minimize"] * 2)
    trial = optuna.trial.create_trial(state=TrialState.RUNNING)
    trial.datetime_start = datetime.now() - timedelta(hours=3)
    trial_id = storage.create_new_trial(study._study_id, template_trial=trial)
    fail_stale_trials(study)
    assert storage.get_trial(trial_id).state == TrialState.RUNNING


def test_workers_that_open_the_study_together_draw_different_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 'db'}"
    space = SearchSpace(num_layers=8)
    first, second = (
        open_study(open_storage(url), "s", seed=0, n_startup_trials=10, model_source="m") for _ in range(2)
    )
    drawn = [space.sample(first.ask()), space.sample(second.ask())]
    assert drawn[0] != drawn[1], "both workers drew the same start-up trial"
    # The draws follow the seed and the trial number: a rerun of the study repeats them.
    again = open_study(open_storage(f"sqlite:///{tmp_path / 'db2'}"), "s", 0, 10, "m")
    assert space.sample(again.ask()) == drawn[0]
    other_seed = open_study(open_storage(f"sqlite:///{tmp_path / 'db3'}"), "s", 1, 10, "m")
    assert space.sample(other_seed.ask()) != drawn[0]


def test_a_study_resumed_with_other_scoring_settings_is_refused():
    study = optuna.create_study(directions=["minimize", "minimize"], study_name="s")
    pin_scoring(study, {"--row-norm": "pre", "--harmful-eval": "100 items, sha256 abc"})
    pin_scoring(study, {"--row-norm": "pre", "--harmful-eval": "100 items, sha256 abc"})  # same: fine
    with pytest.raises(
        UserError, match=r"^study 's' was scored with --row-norm 'pre' \(now 'full'\); give the same"
    ):
        pin_scoring(study, {"--row-norm": "full", "--harmful-eval": "100 items, sha256 abc"})
    # A setting that a study from an older version did not record is accepted.
    pin_scoring(study, {"--row-norm": "pre", "--harmful-eval": "100 items, sha256 abc", "--new": "x"})


def test_a_trial_left_running_by_a_dead_process_of_this_machine_is_failed(tmp_path):
    """The journal storage has no heartbeat: a killed run's orphan is found by its process id."""
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "journal")))
    study = optuna.create_study(storage=storage, directions=["minimize", "minimize"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan, alive, foreign, reused, old_orphan, old_alive = (study.ask() for _ in range(6))
    host = socket.gethostname()
    orphan.set_user_attr("worker", f"{host}:{dead.pid}:{time.time() - 60:.2f}")
    alive.set_user_attr("worker", process_identity())
    foreign.set_user_attr("worker", f"another-host:{dead.pid}:{time.time() - 60:.2f}")
    # A restarted container gives the new run the id its killed run had: the start time tells them apart.
    reused.set_user_attr("worker", f"{host}:{os.getpid()}:{psutil.Process().create_time() - 60:.2f}")
    old_orphan.set_user_attr("worker", f"{host}:{dead.pid}")  # as earlier releases named a worker
    old_alive.set_user_attr("worker", f"{host}:{os.getpid()}")
    fail_stale_trials(study)
    states = {trial.number: trial.state for trial in study.get_trials()}
    assert states == {
        orphan.number: TrialState.FAIL,
        alive.number: TrialState.RUNNING,
        foreign.number: TrialState.RUNNING,
        reused.number: TrialState.FAIL,
        old_orphan.number: TrialState.FAIL,
        old_alive.number: TrialState.RUNNING,
    }


def test_a_journal_file_in_a_new_folder_is_created(tmp_path):
    storage = open_storage(f"journal:{tmp_path / 'new' / 'journal.log'}")
    optuna.create_study(storage=storage, study_name="s").optimize(lambda trial: 1.0, n_trials=1)
    assert (tmp_path / "new" / "journal.log").is_file()


def test_a_journal_cut_in_its_last_line_opens_and_takes_new_trials(tmp_path):
    journal = tmp_path / "study.journal"
    study = optuna.create_study(storage=open_storage(f"journal:{journal}"), study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code":4,"worker_id":"cut-off')  # a write killed midway
    study = optuna.load_study(storage=open_storage(f"journal:{journal}"), study_name="s")
    assert journal.read_bytes() == whole  # the cut operation is dropped, the rest kept
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    reopened = optuna.load_study(storage=open_storage(f"journal:{journal}"), study_name="s")
    assert len(reopened.get_trials(states=(TrialState.COMPLETE,))) == 4


def test_only_a_cut_last_line_is_dropped(tmp_path):
    journal = tmp_path / "j"
    lock = journal_lock(journal)
    journal.write_bytes(b"")
    drop_cut_last_line(journal, lock)
    assert journal.read_bytes() == b""
    journal.write_bytes(b'{"a":1}\n{"b":2}\n')
    drop_cut_last_line(journal, lock)
    assert journal.read_bytes() == b'{"a":1}\n{"b":2}\n'
    assert not (tmp_path / "j.flock").exists()  # a whole journal is read without taking the lock
    journal.write_bytes(b'{"a":1}\n{"b":2')
    drop_cut_last_line(journal, lock)
    assert journal.read_bytes() == b'{"a":1}\n'
    journal.write_bytes(b'{"a":1')  # no whole line at all
    drop_cut_last_line(journal, lock)
    assert journal.read_bytes() == b""
    assert lock_is_free(tmp_path / "j.flock")  # given back


def test_a_line_cut_while_other_workers_go_on_is_dropped_before_their_next_append(tmp_path):
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "study.journal"
    study = optuna.create_study(storage=open_storage(f"journal:{journal}"), study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    with journal.open("ab") as file:  # a worker killed midway through its write
        file.write(b'{"op_code":4,"worker_id":"cut-off')
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)  # this worker goes on
    plain = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))  # Optuna's own reader
    assert (
        len(optuna.load_study(storage=plain, study_name="s").get_trials(states=(TrialState.COMPLETE,))) == 2
    )


def lock_is_free(path) -> bool:
    with open(path, "a") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(probe, fcntl.LOCK_UN)
        return True


def test_a_journal_lock_dies_with_a_worker_killed_while_holding_it(tmp_path):
    journal = tmp_path / "study.journal"
    holds_and_dies = (
        "import os, signal, sys; from pathlib import Path; from abliterate.storage import journal_lock; "
        "journal_lock(Path(sys.argv[1])).acquire(); print('held', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    holder = subprocess.run(
        [sys.executable, "-c", holds_and_dies, str(journal)], capture_output=True, text=True
    )
    assert holder.stdout == "held\n" and holder.returncode == -signal.SIGKILL
    assert lock_is_free(tmp_path / "study.journal.flock")  # Optuna's own lock file would wait out 30 s


@pytest.mark.parametrize(("n_trials", "given", "expected"), [(40, None, 15), (10, None, 10), (100, None, 30), (200, None, 60), (1000, None, 60), (40, 3, 3), (40, 0, 0)])  # fmt: skip
def test_start_up_trials_scale_with_the_study_unless_given(n_trials, given, expected):
    assert startup_trials(n_trials, given) == expected


@pytest.mark.parametrize(
    ("finished", "seconds_left", "expected"),
    [(3, 300.0, 15), (0, 3600.0, 60), (5, 10.0, 6), (2, 0.0, 2), (150, 1e6, 60)],
)  # fmt: skip
def test_under_a_time_budget_start_up_trials_fit_the_trials_expected_in_time(
    finished, seconds_left, expected
):
    # 10 s a trial, --n-trials 200: the 60 random trials of a 200-trial study only when 200 fit.
    assert startup_trials_in_time(200, finished, seconds_left, seconds_per_trial=10.0) == expected


def test_the_samplers_start_up_trials_can_be_resized_while_it_runs(tmp_path):
    space = SearchSpace(num_layers=8)

    def draws(start_up: int | None) -> list[dict]:
        study = open_study(open_storage(f"sqlite:///{tmp_path / f'{start_up}.db'}"), "s", 0, 60, "m")
        if start_up is not None:
            study.sampler.n_startup_trials = start_up
            assert study.sampler.n_startup_trials == start_up
        drawn: list[dict] = []
        study.optimize(lambda trial: (drawn.append(space.sample(trial)), (len(drawn), 0.1))[1], n_trials=4)
        return drawn

    random_only, resized = draws(None), draws(2)
    # The same seeded random start-up trials; then TPE's model draws where the sampler resized to 2.
    assert resized[:2] == random_only[:2] and resized[2:] != random_only[2:]


def test_warm_starts_are_planned_once_and_only_in_a_new_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(open_storage(url), "s", seed=0, n_startup_trials=10, model_source="m")
    starts = [{"direction_index": 1.0}, {"direction_index": 2.0}]
    plan_warm_starts(study, starts)
    plan_warm_starts(study, [{"direction_index": 9.0}])  # a second worker, or a rerun before any trial ran
    assert StudyData(study).warm_starts == starts
    used = open_study(open_storage(f"sqlite:///{tmp_path / 'other.db'}"), "s", 0, 10, "m")
    used.add_trial(optuna.trial.create_trial(values=[1, 0.1], params={}, distributions={}))
    plan_warm_starts(used, starts)
    assert StudyData(used).warm_starts is None and used.sampler.warm_starts == []


def test_bulky_study_data_stays_out_of_the_user_attributes_that_listings_show(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(open_storage(url), "s", seed=0, n_startup_trials=10, model_source="m")
    basis = torch.randn(2, 5, 16)
    StudyData(study).directions = basis
    StudyData(study).warm_starts = [{"direction_index": 1.0}]
    reopened = optuna.load_study(study_name="s", storage=url)
    assert torch.equal(StudyData(reopened).directions, basis)
    assert StudyData(reopened).warm_starts == [{"direction_index": 1.0}]
    assert set(reopened.user_attrs) == {"model"}  # what `optuna studies` prints stays a line


def test_studies_begun_before_the_layout_keep_their_directions_and_plan(tmp_path):
    import base64

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(open_storage(url), "s", seed=0, n_startup_trials=10, model_source="m")
    basis = torch.randn(6, 8)
    encoded = base64.b64encode(basis.numpy().tobytes()).decode("ascii")
    study.set_user_attr("directions", {"shape": [6, 8], "float32_base64": encoded})
    study.set_user_attr("warm_starts", [{"direction_index": 2.0}])
    assert torch.equal(StudyData(study).directions, basis)
    plan_warm_starts(study, [{"direction_index": 9.0}])
    assert study.sampler.warm_starts == [{"direction_index": 2.0}]


def test_the_first_trials_take_the_warm_starts_and_later_ones_are_drawn(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    starts = [{"x": 1.0, "scope": "b"}, {"x": 2.0, "scope": "a"}]

    def objective(trial):
        return trial.suggest_float("x", 0.0, 3.0), float(
            trial.suggest_categorical("scope", ["a", "b"]) == "a"
        )

    study = open_study(open_storage(url), "s", seed=0, n_startup_trials=2, model_source="m")
    plan_warm_starts(study, starts)
    study.optimize(objective, n_trials=3)
    # A resumed study (a new process: a new sampler) goes on drawing; no waiting trials are involved.
    resumed = open_study(open_storage(url), "s", seed=0, n_startup_trials=2, model_source="m")
    resumed.optimize(objective, n_trials=2)
    trials = resumed.get_trials()
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * 5
    assert [trial.params for trial in trials[:2]] == starts
    assert all(trial.params["x"] not in (1.0, 2.0) for trial in trials[2:])


def test_a_study_begun_before_projected_directions_continues_only_with_mean_differences():
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.set_user_attr("scoring", {"--row-norm": "none"})  # pinned before --direction existed
    with pytest.raises(UserError, match=r"--direction 'mean-difference' \(now 'projected'\)"):
        pin_scoring(study, {"--row-norm": "none", "--direction": "projected"})
    pin_scoring(study, {"--row-norm": "none", "--direction": "mean-difference"})
    assert study.user_attrs["scoring"]["--direction"] == "mean-difference"


class CountingEvaluator(FakeEvaluator):
    def __init__(self, outcomes):
        super().__init__(outcomes)
        self.counted = 0

    def refusals(self):
        self.counted += 1
        return super().refusals()


def test_refusals_are_not_counted_for_a_trial_at_least_as_far_as_one_without_refusals():
    """A trial whose KL is at least that of a trial with no refusals is dominated whatever it refuses."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    evaluator = CountingEvaluator([(3, 0.05), (0, 0.2), (1, 0.3), (0, 0.2), (2, 0.1)])
    directions = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    objective = Objective(FakeEditor(), evaluator, directions, SearchSpace(4), "none", baseline_refusals=9)
    run_study(study, objective, n_trials=5)
    assert evaluator.counted == 3  # trials 2 (KL 0.3) and 3 (KL 0.2, a tie) were not generated
    assert [tuple(trial.values) for trial in study.trials] == [
        (3, 0.05),
        (0, 0.2),
        (9, 0.3),
        (9, 0.2),
        (2, 0.1),
    ]
    assert [trial.user_attrs.get("refusals_counted", True) for trial in study.trials] == [
        True,
        True,
        False,
        False,
        True,
    ]
    assert {trial.number for trial in pareto_front(study)} == {0, 1, 4}


def test_every_trials_refusals_are_counted_when_asked():
    study = optuna.create_study(directions=["minimize", "minimize"])
    evaluator = CountingEvaluator([(3, 0.05), (0, 0.2), (1, 0.3)])
    directions = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    objective = Objective(
        FakeEditor(), evaluator, directions, SearchSpace(4), "none", baseline_refusals=9, skip_dominated=False
    )
    run_study(study, objective, n_trials=3)
    assert evaluator.counted == 3 and [tuple(t.values) for t in study.trials] == [
        (3, 0.05),
        (0, 0.2),
        (1, 0.3),
    ]


def test_no_trial_starts_after_the_deadline():
    study = optuna.create_study(directions=["minimize", "minimize"])
    objective, _ = objective_with([(5, 0.1), (3, 0.2)])
    run_study(study, objective, n_trials=2, deadline=time.monotonic() - 1)
    assert not study.trials
    run_study(study, objective, n_trials=2, deadline=time.monotonic() + 3600)
    assert len(study.trials) == 2


def test_an_output_folder_keeps_its_study_in_a_journal_unless_an_earlier_release_left_sqlite(tmp_path):
    assert folder_storage_url(tmp_path) == f"journal:{(tmp_path / 'study.journal').resolve()}"
    assert not folder_holds_study(tmp_path)
    (tmp_path / "study.db").touch()
    assert folder_storage_url(tmp_path) == f"sqlite:///{(tmp_path / 'study.db').resolve()}"
    assert folder_holds_study(tmp_path)

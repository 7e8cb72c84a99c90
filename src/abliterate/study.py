"""The Optuna study: the objective, and running trials from any number of workers.

Each trial samples its parameters from the search space (`space.py`), edits the model, scores it
on two objectives to minimise, refusals and KL divergence, and resets it. The storage is any
Optuna storage URL; the default is a journal file in the output folder (`storage.py`), so rerunning
the same command continues the same study and runs only the trials still missing. Choosing a
trial from the finished study is `select.py`'s.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from abliterate.errors import UserError
from abliterate.evaluate import Evaluator, NumericalFault, Scores
from abliterate.reset import Edit, Editor
from abliterate.space import SearchSpace, edits_from_params
from abliterate.storage import StudyData, fail_stale_trials, process_identity

WORKER_ID = process_identity()  # which process ran a trial: for the record, and to spot orphans
MAX_CONSECUTIVE_FAILURES = 20
# How studies begun before a scoring option existed were scored: what a resume compares against.
SCORING_BEFORE_OPTIONS = {"--direction": "mean-difference", "--refusal-judge": "markers"}


class Objective:
    """One trial: edit, score, reset. The model is always back to the original when it returns."""

    def __init__(
        self,
        editor: Editor,
        evaluator: Evaluator,
        directions: torch.Tensor,
        space: SearchSpace,
        row_norm: str,
        on_scores: Callable[[optuna.Trial, Scores], None] | None = None,
        baseline_refusals: int = 0,
        skip_dominated: bool = True,
    ):
        self.editor = editor
        self.skip_dominated = skip_dominated  # False: count every trial's refusals (timings, analysis)
        self.baseline_refusals = baseline_refusals  # what a trial whose refusals were not counted scores
        self.evaluator = evaluator
        self.directions = directions
        self.space = space
        self.row_norm = row_norm
        self.on_scores = on_scores
        # Where Ctrl-C may raise at once; `run_study` narrows it to the evaluation (see `_Interrupt`).
        self.interruptible: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.n_trials: int | None = None  # set by `run_study`: the study's size, for slot accounting

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        # One read of the storage per trial serves both the slot check and the KL-first skip.
        live = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        if self.n_trials is not None and _is_surplus(trial, live, self.n_trials):
            raise optuna.TrialPruned("another worker holds the last slot")
        trial.set_user_attr("worker", WORKER_ID)  # first: lets a restart on this host spot it orphaned
        params = self.space.sample(trial)
        edits = edits_from_params(params, self.directions)
        timer = PhaseTimer()
        try:
            with self.interruptible():
                skip_from = dominating_kl(live) if self.skip_dominated else math.inf
                scores = self.evaluate(edits, timer, skip_from)
        except NumericalFault as fault:
            trial.set_user_attr("fail_reason", str(fault))
            raise
        if not scores.refusals_counted:
            trial.set_user_attr("refusals_counted", False)
        trial.set_user_attr("seconds", timer.seconds)
        trial.set_user_attr("refusals", scores.refusals)
        if scores.refusals_by_judge:
            trial.set_user_attr("refusals_by_judge", scores.refusals_by_judge)
        trial.set_user_attr("kl", scores.kl)
        trial.set_user_attr("edited_layers", sorted({edit.layer for edit in edits}))
        if self.on_scores is not None:
            self.on_scores(trial, scores)
        return scores.refusals, scores.kl

    def evaluate(
        self,
        edits: list[Edit],
        timer: PhaseTimer | None = None,
        skip_refusals_from_kl: float = math.inf,
    ) -> Scores:
        """Edit, score, reset. From a KL of `skip_refusals_from_kl` up, refusals are not counted:
        the trial scores the original model's count (no better than it)."""
        timer = timer or PhaseTimer()
        try:
            with timer("edit"):
                self.editor.apply(edits, self.row_norm)
            # KL first: one forward pass that catches a broken edit, or one that cannot reach the
            # front, before the costly generation.
            with timer("kl"):
                kl = self.evaluator.kl()
            if kl >= skip_refusals_from_kl:
                return Scores(refusals=self.baseline_refusals, kl=kl, refusals_counted=False)
            with timer("refusals"):
                count = self.evaluator.refusals()
            return Scores(refusals=count.total, kl=kl, refusals_by_judge=count.by_judge() or None)
        finally:
            with timer("reset"):
                self.editor.reset()


def dominating_kl(trials: list[FrozenTrial]) -> float:
    """The lowest KL of a finished trial without refusals among `trials` (inf if none).

    A trial whose KL is at least this is dominated by that trial whatever its refusals, so it can
    never reach the front: counting its refusals would buy nothing but time.
    """
    perfect = [t.values[1] for t in trials if t.state == TrialState.COMPLETE and t.values[0] == 0]
    return min(perfect, default=math.inf)


def _is_surplus(trial: optuna.Trial, live: list[FrozenTrial], n_trials: int) -> bool:
    """True when finished or running trials (`live`) numbered below this one already fill the study."""
    return sum(other.number < trial.number for other in live) >= n_trials


class PhaseTimer:
    """Wall time per phase of a trial; waits for the accelerator so that each phase owns its work."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TrialSeededSampler(optuna.samplers.TPESampler):
    """TPE whose random draws for each trial are seeded by the study's seed and the trial's number,
    and whose first trials take the study's planned warm starts (`plan_warm_starts`).

    A sampler seeded once per process repeats itself in every worker that opens the study at the
    same moment: their random start-up trials would be the same points. Seeded per trial, every
    trial draws differently, and a single-process rerun with the same seed repeats the study.
    Warm starts go by trial number too, not through Optuna's queue of waiting trials: on SQLite
    two workers can pop the same waiting trial, and the second then fails to report it.
    """

    def __init__(self, seed: int, **options):
        super().__init__(seed=seed, **options)
        self.seed = seed
        self.warm_starts: list[dict] = []  # the study's plan, handed over by `plan_warm_starts`

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        super().before_trial(study, trial)
        trial_seed = (self.seed * 1_000_003 + trial.number) % 2**32
        self._rng.rng.seed(trial_seed)  # TPE's own draws
        self._random_sampler._rng.rng.seed(trial_seed)  # the start-up trials' draws

    @property
    def n_startup_trials(self) -> int:
        return self._n_startup_trials

    @n_startup_trials.setter
    def n_startup_trials(self, count: int) -> None:
        """Resized while a study runs under a time budget (see `startup_trials_in_time`)."""
        self._n_startup_trials = count

    def _warm_start(self, trial: FrozenTrial) -> dict | None:
        return self.warm_starts[trial.number] if trial.number < len(self.warm_starts) else None

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        start = self._warm_start(trial)
        if start is not None:
            return {name: start[name] for name in search_space if name in start}
        return super().sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution
    ):
        start = self._warm_start(trial)
        if start is not None and param_name in start:
            return start[param_name]
        return super().sample_independent(study, trial, param_name, param_distribution)


def open_study(
    storage: optuna.storages.BaseStorage, study_name: str, seed: int, n_startup_trials: int, model_source: str
) -> optuna.Study:
    study = optuna.create_study(
        storage=storage, study_name=study_name, directions=["minimize", "minimize"], load_if_exists=True
    )
    study.sampler = TrialSeededSampler(
        seed,
        n_startup_trials=n_startup_trials,
        n_ei_candidates=128,  # a better pick for each trial, at a cost far below a trial's
        multivariate=True,
        constant_liar=True,  # several workers: running trials count as pessimistic results
    )
    stored = StudyData(study)
    stored_model = stored.model
    if stored_model is None:
        stored.model = model_source
    elif not _same_source(stored_model, model_source):
        raise UserError(
            f"study {study_name!r} in this storage belongs to model {stored_model!r}, not {model_source!r}; "
            "pass another --study-name or --output"
        )
    study.set_metric_names(["refusals", "kl"])
    return study


def startup_trials(n_trials: int, n_startup_trials: int | None) -> int:
    """Random trials before TPE takes over: as given, or 30% of the study, at least 15 and at most 60.

    A fixed 60 left a 40-trial study entirely random; 12 of 40 did worse than 15 of 40 on a real
    model (benchmarks/quality.py), and fewer than the study itself stay random.
    """
    if n_startup_trials is not None:
        return n_startup_trials
    return min(n_trials, 60, max(15, round(0.3 * n_trials)))


def startup_trials_in_time(
    n_trials: int, finished: int, seconds_left: float, seconds_per_trial: float
) -> int:
    """Start-up trials for a study that a time budget will end: as `startup_trials` would give a study
    of the trials expected to finish in time (never more than `n_trials`).

    Sized from `n_trials` alone, a 30-minute study of the default 200 trials would draw 60 at random,
    which may be every trial it has time for.
    """
    expected = finished + max(0, int(seconds_left / max(seconds_per_trial, 1e-9)))
    return startup_trials(min(n_trials, max(expected, 1)), None)


def plan_warm_starts(study: optuna.Study, starts: list[dict]) -> None:
    """Make `starts` the parameters of a new study's first trials, and hand the study's plan to its
    sampler (see `TrialSeededSampler`).

    A study that has trials already, or a plan, keeps what it has: a resumed study, or a second
    worker, follows the plan the study was begun with.
    """
    data = StudyData(study)
    planned = data.warm_starts
    if starts and planned is None and not study.get_trials(deepcopy=False):
        data.warm_starts = planned = starts
    study.sampler.warm_starts = planned or []


def _same_source(first: str, second: str) -> bool:
    """One hub id, or one folder however it is written (`models/x`, `models/x/`, `~/models/x`)."""
    return first == second or Path(first).expanduser().resolve() == Path(second).expanduser().resolve()


def pin_scoring(study: optuna.Study, scoring: dict[str, str]) -> None:
    """Store what trial scores depend on; a resumed study (or another worker) must score the same way.

    `scoring` maps an option to its value, or for a list (the prompts) to a digest of it. Trials
    scored under other settings would share one Pareto front without being comparable. Options
    may be pinned in several calls: one not stored yet is added.
    """
    pinned = StudyData(study).scoring
    # A study begun before some options existed was scored as they behaved then.
    stored = {**SCORING_BEFORE_OPTIONS, **pinned} if pinned else {}
    changed = [option for option, value in scoring.items() if stored.get(option, value) != value]
    if changed:
        differences = ", ".join(
            f"{option} {stored[option]!r} (now {scoring[option]!r})" for option in changed
        )
        raise UserError(
            f"study {study.study_name!r} was scored with {differences}; "
            "give the same values to continue it, or pass another --study-name"
        )
    if any(option not in pinned for option in scoring):  # the first run, or a setting pinned later
        StudyData(study).scoring = {**stored, **scoring}


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def run_study(
    study: optuna.Study,
    objective: Objective,
    n_trials: int,
    callbacks: list | None = None,
    poll_seconds: float = 2.0,
    deadline: float | None = None,
) -> None:
    """Run trials until the study holds exactly `n_trials` finished ones, whoever finishes them.

    Any number of workers may run this against one storage. Each trial holds a slot while it
    runs; a worker only starts a trial while slots are free, and a trial that finds, once
    created, that lower-numbered trials already fill every slot gives its slot up at once (pruned,
    before any evaluation). So the study never exceeds `n_trials` finished trials. A slot left
    running by a dead worker is taken back once it is found dead (`fail_stale_trials`): by the
    storage's heartbeat, or at once where the worker ran on this machine.
    No trial starts after `deadline` (a `time.monotonic()` value).
    """
    failures = _ConsecutiveFailures()
    interrupt = _Interrupt(study)
    objective.interruptible = interrupt.evaluating
    objective.n_trials = n_trials
    with interrupt.installed():
        while not interrupt.requested and not failures.stopped:
            if deadline is not None and time.monotonic() >= deadline:
                break
            live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            if sum(trial.state == TrialState.COMPLETE for trial in live) >= n_trials:
                break
            if len(live) >= n_trials:  # the last slots are taken by other workers' running trials
                fail_stale_trials(study)
                time.sleep(poll_seconds)
                continue
            study.optimize(
                objective,
                n_trials=1,
                callbacks=[failures, *(callbacks or [])],
                catch=(NumericalFault,),
                gc_after_trial=False,
                show_progress_bar=False,
            )
    if interrupt.requested:
        raise KeyboardInterrupt
    if failures.stopped:
        raise UserError(
            f"{MAX_CONSECUTIVE_FAILURES} trials in a row failed ({failures.last_reason}); try --dtypes float32 or --row-norm none"
        )


class _Interrupt:
    """Ctrl-C that never lands inside a storage write.

    During a trial's evaluation it raises at once: Optuna records that trial as failed. Anywhere
    else (Optuna or the trial talking to the storage) it asks the study to stop, and the next
    evaluation does not start.
    """

    def __init__(self, study: optuna.Study):
        self.study = study
        self.requested = False
        self._evaluating = False

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self._evaluating:
            raise KeyboardInterrupt
        with contextlib.suppress(RuntimeError):  # between two optimize() calls there is nothing to stop
            self.study.stop()

    @contextlib.contextmanager
    def evaluating(self):
        if self.requested:
            raise KeyboardInterrupt
        self._evaluating = True
        try:
            yield
        finally:
            self._evaluating = False

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers belong to the main thread; elsewhere Ctrl-C is not ours to handle
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class _ConsecutiveFailures:
    def __init__(self):
        self.count = 0
        self.stopped = False
        self.last_reason = ""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            self.count += 1
            self.last_reason = trial.user_attrs.get("fail_reason", "unknown reason")
            if self.count >= MAX_CONSECUTIVE_FAILURES:
                self.stopped = True
                study.stop()
        else:
            self.count = 0

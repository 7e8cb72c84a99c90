"""Choosing the trial to save: the `--select` rules, parsed once, and the Pareto front they read."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from abliterate.errors import UserError
from abliterate.settings import Selection

_NOT_FINISHED = {
    TrialState.FAIL: "it failed",
    TrialState.PRUNED: "it was pruned",
    TrialState.RUNNING: "it is still running",
    TrialState.WAITING: "it has not started",
}


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    return sorted(study.best_trials, key=lambda trial: (trial.values[0], trial.values[1]))


def select_trial(study: optuna.Study, selection: Selection) -> FrozenTrial | None:
    """The trial `selection` picks from the study's finished trials (None for `none`)."""
    if selection.rule == "none":
        return None
    if selection.rule == "trial":
        return finished_trial(study, selection.trial_number)
    front = pareto_front(study)
    if not front:
        raise UserError("the study has no finished trial to select")
    if selection.rule == "min-refusals":
        return min(front, key=lambda trial: (trial.values[0], trial.values[1]))
    if selection.rule == "min-kl":
        return min(front, key=lambda trial: (trial.values[1], trial.values[0]))
    if selection.rule == "max-kl":
        limit = selection.kl_limit
        within = [trial for trial in front if trial.values[1] <= limit]
        if not within:
            lowest = min(trial.values[1] for trial in front)
            raise UserError(
                f"--select {selection}: no finished trial has KL <= {limit:g} (the lowest is {lowest:.4f}); raise the limit"
            )
        return min(within, key=lambda trial: (trial.values[0], trial.values[1]))
    return knee(front)


def finished_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial `number`, which must have finished: anything else is one line naming the front."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for trial in finished:
        if trial.number == number:
            return trial
    numbered = [trial for trial in study.get_trials(deepcopy=False) if trial.number == number]
    state = _NOT_FINISHED[numbered[0].state] if numbered else "it does not exist"
    front = ", ".join(str(trial.number) for trial in pareto_front(study)) or "none"
    raise UserError(
        f"--select trial:{number}: the study has no finished trial {number} ({state}; "
        f"{len(finished)} finished; on the Pareto front: {front})"
    )


def knee(front: list[FrozenTrial]) -> FrozenTrial:
    """The front's knee: the trial farthest below the line joining its two ends (Kneedle).

    Both objectives are scaled to [0, 1] over the front, so the ends sit at (0, 1) and (1, 0) and
    the distance below the line between them grows with 1 - refusals - KL: the knee is where one
    more refusal removed starts to cost more KL than the front's average trade. Ties go to fewer
    refusals. (The point nearest the ideal corner would favour balance, and on a front whose
    low-KL end still refuses most prompts it stops half-way.)
    """
    refusals = [trial.values[0] for trial in front]
    kls = [trial.values[1] for trial in front]

    def scaled(value: float, values: list[float]) -> float:
        low, high = min(values), max(values)
        return 0.0 if high == low else (value - low) / (high - low)

    return min(
        front,
        key=lambda trial: (
            # Rounded: trials equally far from the line must tie, not differ in the last bit.
            round(scaled(trial.values[0], refusals) + scaled(trial.values[1], kls), 9),
            trial.values[0],
        ),
    )

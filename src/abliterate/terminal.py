"""What the terminal shows: progress bars, the Pareto front table, the selection question, failed trials.

The recipe (`pipeline.py`) calls these; none of them changes a study.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import optuna
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from abliterate.settings import Selection
from abliterate.space import direction_scope_of


def report_failed_trials(study: optuna.Study, console: Console, shown: int = 5) -> None:
    """One line per failed trial of the study (the last `shown`), so that a gap in the numbering is explained."""
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    if len(failed) > shown:
        console.print(f"{len(failed)} trials failed; the last {shown}:")
    for trial in failed[-shown:]:
        reason = trial.user_attrs.get(
            "fail_reason", "killed or interrupted (its run stopped during the trial)"
        )
        console.print(f"trial {trial.number:>4}: failed, {reason}")


def mean_trial_seconds(finished: list[optuna.trial.FrozenTrial]) -> float | None:
    """The study's own mean trial time (start to finish), for the time left; None before any trial."""
    durations = [
        (trial.datetime_complete - trial.datetime_start).total_seconds()
        for trial in finished
        if trial.datetime_start and trial.datetime_complete
    ]
    return sum(durations) / len(durations) if durations else None


def seconds_per_finished_trial(
    finished: list[optuna.trial.FrozenTrial], since: datetime, now: datetime | None = None
) -> float | None:
    """Seconds per trial the whole study finishes, from the trials any worker finished since `since`:
    with N workers sharing a study, a trial's own duration overstates by N how long the study takes
    to finish one more. Before the first of those, the study's mean trial time stands in."""
    recent = sum(1 for trial in finished if trial.datetime_complete and trial.datetime_complete >= since)
    if not recent:
        return mean_trial_seconds(finished)
    return ((now or datetime.now()) - since).total_seconds() / recent


class StudyTimeRemaining(ProgressColumn):
    """Time left from the study's mean trial time (rich's own estimate forgets samples older than
    30 s, so with longer trials it shows nothing); other bars keep rich's estimate."""

    def __init__(self):
        super().__init__()
        self._fallback = TimeRemainingColumn()

    def render(self, task: Task) -> Text:
        seconds_per_trial = task.fields.get("seconds_per_trial")
        if seconds_per_trial is None or task.total is None:
            return self._fallback.render(task)
        left = max(0.0, task.total - task.completed) * seconds_per_trial
        return Text(str(timedelta(seconds=round(left))), style="progress.remaining")


def front_table(front, eval_prompts: int | None) -> Table:
    table = Table(title="Pareto front (refusals vs KL divergence)")
    judged = judged_by_classifier(front)
    for column in ("trial", "refusals", *(JUDGE_COLUMNS if judged else ()), "KL", "direction"):
        table.add_column(column, justify="right")
    for trial in front:
        table.add_row(
            str(trial.number),
            f"{int(trial.values[0])}/{eval_prompts}" if eval_prompts else str(int(trial.values[0])),
            *(judge_cells(trial.user_attrs.get("refusals_by_judge", {})) if judged else ()),
            f"{trial.values[1]:.4f}",
            direction_cell(trial.params),
        )
    return table


JUDGE_COLUMNS = ("markers", "classifier")


def judged_by_classifier(trials) -> bool:
    """Whether a classifier judged beside the markers: then each one's count has a column."""
    return any("refusals_by_judge" in trial.user_attrs for trial in trials)


def judge_cells(counts: dict[str, int]) -> list[str]:
    """The markers' and the classifier's counts ("-" where they were not counted)."""
    return [str(counts.get(judge, "-")) for judge in JUDGE_COLUMNS]


def direction_cell(params: dict) -> str:
    """Where a trial's direction comes from: a layer index or each layer's own, and how far it was
    projected against the harmless mean when that was searched or chosen."""
    global_scope = direction_scope_of(params) == "global"
    cell = f"layer {params['direction_index']:.2f}" if global_scope else "per layer"
    projection = params.get("direction_projection")
    if projection is not None:
        named = {0.0: "mean difference", 1.0: "projected"}  # both ends, as `--direction choose` draws
        cell += f", {named[projection]}" if projection in named else f", projected {projection:.2f}"
    return cell


def ask_selection(front) -> Selection:
    """Ask on the terminal until the answer is a trial of the front or a way to pick one."""
    numbers = {str(trial.number) for trial in front}
    while True:
        answer = (
            input("trial to save (number, knee, min-refusals, min-kl, max-kl:X, none) [knee]: ").strip()
            or "knee"
        )
        if answer in numbers:
            return Selection("trial", int(answer))
        try:
            selection = Selection.parse(answer)
        except ValueError:
            selection = None
        if selection is not None and selection.rule != "trial":
            return selection
        print(f"not one of the trials above: {answer}")


def progress_bars(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        StudyTimeRemaining(),
        console=console,
        transient=False,
    )


def judge_counts(by_judge: dict[str, int] | None) -> str:
    """` (markers M, classifier C; D differ)` where a classifier judged beside the markers, else ""."""
    if not by_judge:
        return ""
    return (
        f" (markers {by_judge['markers']}, classifier {by_judge['classifier']}; "
        f"{by_judge['disagreements']} differ)"
    )

"""`abliterate evaluate`: score any model against its original, exactly as a study scores a trial.

The same prompt sets, refusal judge, system prompt, response length and KL (on the harmless eval
prompts, against the original's) as a study with the same
settings: so a saved model, another tool's abliteration and the original can be compared on one
scale. With `--tasks`, both also run capability benchmarks (lm-evaluation-harness, `tasks.py`). The
original is scored first and freed before the model loads: one model in memory at a time.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from abliterate.errors import UserError
from abliterate.evaluate import Evaluator, eval_batch_size, load_for_scoring, refusal_judge
from abliterate.export import MARKER, MODEL_FOLDER, write_card_section, write_file_atomically
from abliterate.model import model_name
from abliterate.prompts import load_prompts
from abliterate.settings import Settings
from abliterate.tasks import TaskScores, run_tasks, task_differences


@dataclass(frozen=True)
class Evaluation:
    """A model's scores beside its original's, with what they were measured on."""

    model: str
    original: str
    eval_prompts: int
    refusals: int
    original_refusals: int
    kl: float
    harmless_prompts: int
    max_response_length: int
    kl_tokens: int
    system_prompt: str | None
    refusal_judge: str = "markers"
    # Each judge's count where a classifier judged beside the markers (`RefusalCount.by_judge`).
    refusals_by_judge: dict[str, int] | None = None
    original_refusals_by_judge: dict[str, int] | None = None
    # lm-eval scores per task and metric (`--tasks`), of each model, and the model's minus the original's.
    tasks: TaskScores | None = None
    original_tasks: TaskScores | None = None
    task_differences: TaskScores | None = None


@dataclass(frozen=True)
class TaskRequest:
    """`--tasks`: lm-eval task names, a folder of task YAML files, and at most how many examples a task."""

    names: list[str]
    path: Path | None = None
    limit: int | None = None

    def run(self, model, system_prompt: str | None) -> TaskScores:
        return run_tasks(model, self.names, self.path, self.limit, system_prompt=system_prompt)


def model_to_score(settings: Settings) -> str:
    """`--model`, which evaluate cannot do without."""
    if settings.model is None:
        raise UserError("abliterate evaluate needs --model: the model to score (a folder or hub id)")
    return settings.model


def evaluate_model(
    settings: Settings, original: str, console: Console, tasks: TaskRequest | None = None
) -> Evaluation:
    """Refusals of `settings.model` and of `original` on the harmful eval prompts, the KL between
    them on the harmless ones, and both models' `tasks` scores."""
    model_to_score(settings)
    harmful = load_prompts(settings.harmful_eval, "--harmful-eval")
    harmless = load_prompts(settings.harmless_eval, "--harmless-eval")
    console.print(f"loading the original, {original}")
    reference = load_for_scoring(original, settings)
    judge = refusal_judge(settings, reference)
    batch_size = eval_batch_size(settings, reference, harmful)
    # Both models read the prompts as the original's tokenizer and template write them, as in a study.
    evaluator = Evaluator(
        reference, harmful, harmless, judge, batch_size, settings.max_response_length, settings.kl_tokens
    )
    original_refusals = evaluator.refusals()
    original_tasks = _run_tasks(tasks, reference, original, settings, console)
    vocabulary = reference.tokenizer.get_vocab()
    evaluator.model = reference = None
    _free_memory()

    console.print(f"loading {settings.model}")
    candidate = load_for_scoring(settings.model, settings)
    if candidate.tokenizer.get_vocab() != vocabulary:
        raise UserError(
            f"{settings.model} and {original} have different vocabularies: KL compares next-token "
            "distributions over one vocabulary; give the model this one was made from as --original"
        )
    evaluator.model = candidate
    kl = evaluator.kl()
    refusals = evaluator.refusals()
    model_tasks = _run_tasks(tasks, candidate, settings.model, settings, console)
    return Evaluation(
        model=settings.model,
        original=original,
        eval_prompts=len(harmful),
        refusals=refusals.total,
        original_refusals=original_refusals.total,
        kl=kl,
        harmless_prompts=len(harmless),
        max_response_length=settings.max_response_length,
        kl_tokens=settings.kl_tokens,
        system_prompt=settings.system_prompt,
        refusal_judge=settings.refusal_judge,
        refusals_by_judge=refusals.by_judge() or None,
        original_refusals_by_judge=original_refusals.by_judge() or None,
        tasks=model_tasks,
        original_tasks=original_tasks,
        task_differences=task_differences(model_tasks, original_tasks) if tasks else None,
    )


def _run_tasks(
    tasks: TaskRequest | None, model, name: str, settings: Settings, console: Console
) -> TaskScores | None:
    if tasks is None:
        return None
    console.print(f"lm-eval tasks on {name}: {', '.join(tasks.names)}")
    return tasks.run(model, settings.system_prompt)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluation_table(evaluation: Evaluation) -> Table:
    table = Table(
        title=f"refusals on {evaluation.eval_prompts} harmful prompts, KL on {evaluation.harmless_prompts} harmless"
    )
    by_judge = evaluation.refusals_by_judge is not None
    judges = ("markers", "classifier") if by_judge else ()
    refusals_title = f"refusals ({evaluation.refusal_judge})" if by_judge else "refusals"
    for column in ("model", refusals_title, *judges, "KL"):
        table.add_column(column, justify="right" if column != "model" else "left")
    rows = (
        (
            f"{evaluation.original} (original)",
            evaluation.original_refusals,
            evaluation.original_refusals_by_judge,
            "0",
        ),
        (evaluation.model, evaluation.refusals, evaluation.refusals_by_judge, f"{evaluation.kl:.4f}"),
    )
    for name, refusals, counts, kl in rows:
        shown = [f"{n}/{evaluation.eval_prompts}" for n in (refusals, *(counts[j] for j in judges))]
        table.add_row(name, *shown, kl)
    return table


def task_table(evaluation: Evaluation) -> Table:
    table = Table(title="lm-evaluation-harness")
    for column in ("task", "metric", "original", "model", "difference"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, metric, original, score, difference in task_rows(evaluation):
        table.add_row(task, metric, f"{original:.4f}", f"{score:.4f}", f"{difference:+.4f}")
    return table


def task_rows(evaluation: Evaluation) -> list[tuple[str, str, float, float, float]]:
    """(task, metric, original, model, difference) for every metric both models have."""
    return [
        (task, metric, evaluation.original_tasks[task][metric], evaluation.tasks[task][metric], difference)
        for task, differences in (evaluation.task_differences or {}).items()
        for metric, difference in differences.items()
    ]


def task_card_section(evaluation: Evaluation) -> str:
    """The model card's section of capability scores (Markdown)."""
    rows = "\n".join(
        f"| {task} | {metric} | {original:.4f} | {score:.4f} | {difference:+.4f} |"
        for task, metric, original, score, difference in task_rows(evaluation)
    )
    return (
        "## Capability benchmarks\n\n"
        f"lm-evaluation-harness, measured by `abliterate evaluate --tasks` against `{evaluation.original}`.\n\n"
        "| task | metric | original | this model | difference |\n|---|---|---|---|---|\n" + rows
    )


def record_tasks_in_card(evaluation: Evaluation) -> bool:
    """Add the task scores to the model card when the model is one abliterate saved."""
    return bool(evaluation.tasks) and write_card_section(
        Path(evaluation.model), task_card_section(evaluation)
    )


def default_json_path(model: str) -> Path:
    """`evaluation-NAME.json`; a study's saved model is named by its output folder (every one of
    them is a `model` folder, so two evaluations would share the name)."""
    folder = Path(model).expanduser()
    if folder.name == MODEL_FOLDER and (folder.parent / MARKER).is_file():
        return Path(f"evaluation-{model_name(str(folder.parent))}.json")
    return Path(f"evaluation-{model_name(model)}.json")


def check_writable(path: Path) -> None:
    """One line now, before any model loads, where the scores could not be written at the end."""
    target = existing = path.resolve()
    while not existing.exists():
        existing = existing.parent
    if existing == target and existing.is_dir():
        raise UserError(f"--json {path} is a folder; name a file")
    if existing != target and not existing.is_dir():
        raise UserError(f"--json {path}: {existing} is a file, not a folder; choose another --json")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK):
        raise UserError(f"--json {path}: {folder} is not writable; choose another --json")


def write_json(evaluation: Evaluation, path: Path) -> None:
    """Write the evaluation atomically: a file that exists is whole."""
    write_file_atomically(path, (json.dumps(asdict(evaluation), indent=1) + "\n").encode())

"""Capability benchmarks through EleutherAI's lm-evaluation-harness (the `tasks` extra).

`abliterate evaluate --tasks mmlu,gsm8k` scores the model and its original on the same tasks, so
that what an abliteration costs in capability sits beside what it removed in refusals. Tasks are
lm-eval's own names (hub datasets, downloaded by lm-eval), or tasks of your own: a folder of task
YAML files given as `--task-path`. Every task reads its prompts through the model's chat template,
after the study's system prompt (before the first message where the template takes no system
message, as in a study), as the model is used; the model is scored as it is loaded,
without being moved or reloaded, and its `generation_config.max_new_tokens` is lifted while
lm-eval runs, as it would override each task's own generation length.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

from abliterate.errors import UserError
from abliterate.model import ChatModel, fold_system_message

# A task's scores: lm-eval's "metric,filter" keys (`acc,none`, `exact_match,strict-match`) to values.
TaskScores = dict[str, dict[str, float]]


def _harness_model(harness_class: type, model: ChatModel, batch_size: int):
    """lm-eval's model around ours. Where the chat template takes no system message, lm-eval would
    drop the system prompt; it goes before the first message instead, as in a study's scoring."""

    class Harness(harness_class):
        def apply_chat_template(
            self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
        ) -> str:
            if not model.template_takes_system_prompt:
                chat_history = fold_system_message(chat_history)
            return super().apply_chat_template(chat_history, add_generation_prompt)

    return Harness(pretrained=model.model, tokenizer=model.tokenizer, batch_size=batch_size)


def run_tasks(
    model: ChatModel,
    tasks: Sequence[str],
    task_path: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    system_prompt: str | None = None,
) -> TaskScores:
    """Each task's metrics for `model` (standard errors left out)."""
    try:
        import lm_eval
        import lm_eval.evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            "--tasks runs lm-evaluation-harness: pip install lm-eval (or abliterate's tasks extra)"
        ) from None
    if task_path is not None and not task_path.is_dir():
        raise UserError(f"--task-path {task_path} is not a folder of task YAML files")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = _task_manager(TaskManager, tasks, task_path)
    generation = model.model.generation_config
    max_new_tokens, generation.max_new_tokens = generation.max_new_tokens, None
    try:
        with contextlib.ExitStack() as quiet:
            # lm-eval asks git for its commit and torch for an environment report: noise and seconds.
            quiet.enter_context(mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None))
            quiet.enter_context(mock.patch.object(lm_eval.evaluator, "add_env_info", lambda _results: None))
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))  # its progress bars
            results = lm_eval.simple_evaluate(
                model=_harness_model(HFLM, model, batch_size),
                tasks=list(tasks),
                task_manager=manager,
                limit=limit,
                log_samples=False,
                bootstrap_iters=0,
                apply_chat_template=True,
                system_instruction=system_prompt,
            )
    except (FileNotFoundError, ConnectionError) as error:
        raise UserError(f"--tasks: {str(error).splitlines()[0]}") from None
    finally:
        generation.max_new_tokens = max_new_tokens
    return {
        task: {
            key: float(value)
            for key, value in metrics.items()
            if "," in key
            and "_stderr," not in key
            and isinstance(value, int | float)
            and math.isfinite(value)
        }
        for task, metrics in sorted(results["results"].items())
    }


def _task_manager(task_manager_class, tasks: Sequence[str], task_path: Path | None):
    """A task index that knows `tasks`: the --task-path folder alone when it holds them all (instant),
    else with lm-eval's own ~15k task names (seconds to index). Unknown names are one error."""
    include = str(task_path) if task_path is not None else None
    manager = task_manager_class(include_path=include, include_defaults=False)
    if any(task not in manager.all_tasks for task in tasks):
        manager = task_manager_class(include_path=include)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" or in --task-path {task_path}" if task_path is not None else ""
        raise UserError(
            f"unknown lm-eval task {', '.join(unknown)}: not one of lm-eval's tasks{where}; "
            "`lm-eval ls tasks` lists them"
        )
    return manager


def task_differences(model: TaskScores, original: TaskScores) -> TaskScores:
    """The model's score minus the original's, for every metric both have."""
    return {
        task: {
            key: value - original[task][key]
            for key, value in metrics.items()
            if key in original.get(task, {})
        }
        for task, metrics in model.items()
    }

"""One worker process of `--workers N`: prepare the study, run trials, stop (see `workers.py`).

The launcher (`workers.launch`) passes the settings, the worker's name and its role in the environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import optuna
from rich.console import Console

from abliterate.errors import UserError
from abliterate.pipeline import prepare, quiet_libraries, search
from abliterate.settings import Settings
from abliterate.storage import StudyData
from abliterate.workers import (
    FOLLOWS_VARIABLE,
    LOADED_FD_VARIABLE,
    NAME_VARIABLE,
    SETTINGS_VARIABLE,
    announce_loaded,
    wait_for_first_worker,
)


def main() -> int:
    """Entry point of one worker process (started by `workers.launch`)."""
    settings = Settings.model_validate_json(os.environ[SETTINGS_VARIABLE])
    name = os.environ.get(NAME_VARIABLE, "worker")
    console = LabelledConsole(f"{name}: ")
    quiet_libraries()
    try:
        session = prepare(settings, console, on_study_open=_role(console))
        search(session, console)
    except UserError as error:
        print(f"abliterate: {name}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


def _role(console: Console) -> Callable[[optuna.Study], None] | None:
    """What this worker does once its model has loaded: the first says so, the others wait for it."""
    if LOADED_FD_VARIABLE in os.environ:
        descriptor = int(os.environ[LOADED_FD_VARIABLE])
        return lambda study: announce_loaded(descriptor)
    if FOLLOWS_VARIABLE in os.environ:

        def follow(study: optuna.Study) -> None:
            if not StudyData(study).ready_for_trials:
                console.print("loaded; waiting for worker 0's refusal directions and baseline")
                wait_for_first_worker(study)

        return follow
    return None


class LabelledConsole(Console):
    """Several workers share one terminal: every line a worker prints starts with its name."""

    def __init__(self, label: str):
        super().__init__(stderr=True, soft_wrap=True, highlight=False)
        self.label = label

    def print(self, *objects, **options) -> None:
        if objects and isinstance(objects[0], str):
            objects = (self.label + objects[0], *objects[1:])
        super().print(*objects, **options)


if __name__ == "__main__":
    raise SystemExit(main())

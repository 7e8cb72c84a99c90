"""Several workers on one machine: one process per GPU, all sharing one study.

Each worker is an ordinary study process (`pipeline.prepare` + `pipeline.search`) with its own
copy of the model on its own GPU. They coordinate only through the Optuna storage, exactly as
workers on other machines started with the same `--storage` and `--study-name` do. The first
worker computes the refusal directions and stores them in the study; the others start once they
are there, so every worker uses the same directions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch

from abliterate.errors import UserError
from abliterate.settings import Settings

SETTINGS_VARIABLE = "ABLITERATE_WORKER_SETTINGS"
NAME_VARIABLE = "ABLITERATE_WORKER_NAME"


def launch(
    settings: Settings, storage_url: str, study_name: str, output: Path, poll_seconds: float = 1.0
) -> None:
    """Run `settings.workers` worker processes to the end of the study."""
    gpus = settings.gpus if settings.gpus is not None else list(range(torch.cuda.device_count()))
    if gpus and settings.workers > len(gpus):
        raise UserError(
            f"--workers {settings.workers} needs one GPU each, but only {len(gpus)} are given ({gpus})"
        )
    worker_settings = settings.model_copy(
        update={
            "workers": 1, "gpus": None, "select": "none", "chat": False,
            "storage": storage_url, "study_name": study_name, "output": output,
        }
    )  # fmt: skip
    processes: list[subprocess.Popen] = []
    try:
        for index in range(settings.workers):
            environment = dict(os.environ)
            environment[SETTINGS_VARIABLE] = worker_settings.model_dump_json()
            environment[NAME_VARIABLE] = f"worker {index}" + (f" (GPU {gpus[index]})" if gpus else "")
            if gpus:
                environment["CUDA_VISIBLE_DEVICES"] = str(gpus[index])
            processes.append(subprocess.Popen([sys.executable, "-m", "abliterate.workers"], env=environment))
            if index == 0:
                _wait_for_directions(processes[0], storage_url, study_name, poll_seconds)
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        # The terminal sends Ctrl-C to the workers too; let them record their trials and stop.
        for process in processes:
            process.wait()
        raise
    if any(code != 0 for code in codes):
        raise UserError(f"a worker stopped with an error (exit codes {codes}); see its messages above")


def _wait_for_directions(
    first: subprocess.Popen, storage_url: str, study_name: str, poll_seconds: float
) -> None:
    """Hold the other workers back until the first has stored the directions (or has failed)."""
    from abliterate.study import open_storage

    storage = open_storage(storage_url)
    while first.poll() is None:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
            if "directions" in study.user_attrs and "baseline_refusals" in study.user_attrs:
                return
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(poll_seconds)
    if first.returncode != 0:
        raise UserError(f"the first worker stopped with exit code {first.returncode}; see its messages above")


def main() -> int:
    """Entry point of one worker process (started by `launch`)."""
    from rich.console import Console

    from abliterate.pipeline import prepare, quiet_libraries, search

    settings = Settings.model_validate_json(os.environ[SETTINGS_VARIABLE])
    name = os.environ.get(NAME_VARIABLE, "worker")
    console = Console(stderr=True)
    quiet_libraries()
    try:
        session = prepare(settings, console)
        search(session, console, label=f"{name}: ")
    except UserError as error:
        print(f"abliterate: {name}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a resumed study waits for before its next trial, with and without the compile cache its folder keeps.

For each model shape: a short study with the compiled decoder (`--compile true`), then two copies of its
folder resumed for a few more trials, one as it was and one without its `compile-cache/` (torch.compile's
generated code and kernels, see `compiled.keep_compiled_code_in`). Printed per run: its wall time, and the
time from its start to its first new trial's start and end (the storage's times). A first run compiles
the decoder while it counts the original model's refusals, before its first trial; a resumed run has
that count stored, so it compiles (or loads the compiled code) in its first new trial.

    PYTHONPATH=src:/tmp/site:benchmarks python3 benchmarks/resume.py --workdir /dev/shm/resume --models 0.5b,7b
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
from trials import SYSTEM_PROMPT, prepare_model

from abliterate.compiled import COMPILE_CACHE
from abliterate.storage import folder_storage_url, open_storage


def run_study(model: Path, output: Path, trials: int, args) -> tuple[float, float, float]:
    """Run (or resume) a study up to `trials`: its wall time, and the seconds until its first new
    trial began and ended."""
    storage = folder_storage_url(output)
    done = len(_trials(output)) if output.exists() else 0
    command = [
        sys.executable, "-m", "abliterate", "--model", str(model), "--output", str(output),
        "--dtypes", "bfloat16", "--max-response-length", str(args.max_response_length),
        "--n-trials", str(trials), "--n-startup-trials", str(trials), "--seed", "0", "--compile", "true",
        "--system-prompt", SYSTEM_PROMPT, "--select", "none", "--skip-dominated", "false", "--storage", storage,
    ]  # fmt: skip
    # The study's folder decides where compiled code goes; a cache named by the environment would not.
    environment = {name: value for name, value in os.environ.items() if name != "TORCHINDUCTOR_CACHE_DIR"}
    started_at = datetime.now()
    started = time.perf_counter()
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, env=environment)
    wall = time.perf_counter() - started
    first_new = min((t for t in _trials(output) if t.number >= done), key=lambda t: t.number)
    return (
        wall,
        (first_new.datetime_start - started_at).total_seconds(),
        (first_new.datetime_complete - started_at).total_seconds(),
    )


def _trials(output: Path) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(folder_storage_url(output), existing=True)
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    return study.get_trials(deepcopy=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--models", default="0.5b", help="shapes from trials.py, comma-separated")
    parser.add_argument("--trials", type=int, default=2, help="trials of the first run")
    parser.add_argument("--more", type=int, default=2, help="trials each resumed run adds")
    parser.add_argument("--max-response-length", type=int, default=64)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        model = prepare_model(name, args.workdir)
        first = args.workdir / f"study-{name}"
        shutil.rmtree(first, ignore_errors=True)
        rows.append((name, "first run (compiles)", *run_study(model, first, args.trials, args)))
        for label, keep_cache in (("resumed, cache kept", True), ("resumed, cache removed", False)):
            copy = args.workdir / f"study-{name}-{'kept' if keep_cache else 'removed'}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(first, copy)
            if not keep_cache:
                shutil.rmtree(copy / COMPILE_CACHE)
            rows.append((name, label, *run_study(model, copy, args.trials + args.more, args)))
    print(f"\n{'model':<6} {'run':<24} {'wall s':>8} {'first new trial begins s':>25} {'and ends s':>11}")
    for name, label, wall, begins, ends in rows:
        print(f"{name:<6} {label:<24} {wall:>8.1f} {begins:>25.1f} {ends:>11.1f}")


if __name__ == "__main__":
    main()

"""The run loop's own time per trial, by storage: what a trial costs the host outside the model.

Runs `study.run_study` with the real `Objective`, search space and sampler (`study.open_study`), but
with stand-ins for the editor and the evaluator that take no time, so what is measured is Optuna's
and the loop's bookkeeping: the trial's creation, its parameters, the live trials read for slot
accounting and the KL-first skip, its user attributes, the tell, the heartbeat and stale-trial
checks. Each storage runs the same study (same seed, same random scores) in a fresh folder; on a
GPU this time leaves the GPU idle, so it bounds how fast a small model's trials can run.

    PYTHONPATH=src python benchmarks/bookkeeping.py --trials 200 --startup 15 --storages sqlite,journal
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import torch

from abliterate.judge import RefusalCount
from abliterate.space import SearchSpace
from abliterate.storage import JOURNAL_FILE, SQLITE_FILE, open_storage
from abliterate.study import Objective, open_study, run_study


class NoEdits:
    def apply(self, edits, row_norm: str = "none") -> None:
        pass

    def reset(self) -> None:
        pass


class RandomScores:
    """Scores drawn from a seeded generator: every storage sees the same study."""

    def __init__(self, seed: int, prompts: int = 100):
        self.random = random.Random(seed)
        self.prompts = prompts

    def kl(self) -> float:
        return self.random.uniform(0.0, 2.0)

    def refusals(self) -> RefusalCount:
        count = self.random.randint(0, self.prompts)
        return RefusalCount(total=count, markers=count)


def storage_url(kind: str, folder: Path) -> str:
    """The storage of a study in `folder`: `journal` (the default since session 14) or `sqlite` (before)."""
    if kind == "sqlite":
        return f"sqlite:///{(folder / SQLITE_FILE).resolve()}"
    if kind == "journal":
        return f"journal:{folder / JOURNAL_FILE}"
    raise ValueError(f"unknown storage kind {kind!r}: sqlite or journal")


def measure(kind: str, trials: int, startup: int, layers: int, folder: Path) -> tuple[float, optuna.Study]:
    """Milliseconds of bookkeeping per trial for a study of `trials` trials in one storage, and the study."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = open_study(open_storage(storage_url(kind, folder)), "bookkeeping", 0, startup, "stand-in")
    objective = Objective(
        NoEdits(), RandomScores(seed=0), torch.zeros(layers + 1, 8), SearchSpace(layers), "none"
    )
    started = time.perf_counter()
    run_study(study, objective, trials)
    return (time.perf_counter() - started) / trials * 1000, study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--startup", type=int, default=15, help="random start-up trials before TPE")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--storages", default="sqlite,journal")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"{args.trials} trials ({args.startup} start-up), a {args.layers}-layer search space")
    print("| storage | ms of bookkeeping a trial |\n|---|---|")
    for kind in args.storages.split(","):
        with tempfile.TemporaryDirectory() as folder:
            milliseconds, _ = measure(kind, args.trials, args.startup, args.layers, Path(folder))
            print(f"| {kind} | {milliseconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()

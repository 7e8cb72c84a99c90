"""Does the shared study storage hold several workers back? Trials per hour without a model.

Each worker is a process that runs the study's own ask (`study.open_study`, our search space for a
30-layer model), sleeps for what a trial costs on the GPU (`--trial-seconds`), and tells, against
one SQLite study, as `--workers N` does; every trial is random (start-up), as in throughput.py.
If the storage were the limit, N workers would stay far below N times one worker's rate.

    PYTHONPATH=src python benchmarks/storage_contention.py --trial-seconds 0.28 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
import warnings

import optuna

from abliterate.space import SearchSpace
from abliterate.storage import open_storage
from abliterate.study import open_study

LAYERS = 30
ALL_RANDOM = 10**6  # start-up trials: more than any run here


def work(url: str, seconds: float, trial_seconds: float, results: multiprocessing.Queue) -> None:
    """Trials for `seconds`; puts (trials done, median and max seconds in ask + sample + tell)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    study = open_study(open_storage(url), "contention", 0, ALL_RANDOM, "stand-in")
    space = SearchSpace(LAYERS)
    storage_seconds = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        trial = study.ask()
        space.sample(trial)
        asked = time.perf_counter()
        time.sleep(trial_seconds)  # the model's work
        slept = time.perf_counter()
        study.tell(trial, (1.0, 0.5))
        storage_seconds.append(asked - started + time.perf_counter() - slept)
    results.put((len(storage_seconds), statistics.median(storage_seconds), max(storage_seconds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial-seconds", type=float, default=0.28, help="the GPU's part of a trial")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=40, help="how long each worker count runs")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    print("| workers | trials per hour | x one worker | storage ms a trial, median (max) per worker |")
    print("|---|---|---|---|")
    one = None
    for workers in [int(n) for n in args.workers.split(",")]:
        url = f"sqlite:///{tempfile.mkdtemp()}/study.db"
        # Created once, before the workers race to it.
        open_study(open_storage(url), "contention", 0, ALL_RANDOM, "stand-in")
        results: multiprocessing.Queue = multiprocessing.Queue()
        processes = [
            multiprocessing.Process(target=work, args=(url, args.seconds, args.trial_seconds, results))
            for _ in range(workers)
        ]
        for process in processes:
            process.start()
        done = [results.get() for _ in processes]
        for process in processes:
            process.join()
        per_hour = sum(trials for trials, *_ in done) / args.seconds * 3600
        one = one or per_hour
        storage = ", ".join(f"{median * 1000:.0f} ({longest * 1000:.0f})" for _, median, longest in done)
        print(f"| {workers} | {per_hour:.0f} | {per_hour / one:.2f}x | {storage} |", flush=True)


if __name__ == "__main__":
    main()

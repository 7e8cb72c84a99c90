"""The sampler's own time per trial as a study grows: what a trial costs before any model work.

Runs the study's sampler (`study.open_study`: multivariate TPE with 128 candidates, constant liar,
per-trial seeding, our search space) against a cheap stand-in objective whose two scores depend on
the parameters, in an SQLite storage like a real study's, and reports the median seconds from asking
for a trial to its parameters being drawn, per window of trials.

    PYTHONPATH=src python benchmarks/sampler.py --trials 300 --layers 28
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import optuna

from abliterate.space import SearchSpace
from abliterate.storage import open_storage
from abliterate.study import open_study, startup_trials


def stand_in_scores(params: dict, layers: int) -> tuple[float, float]:
    """Refusals fall and KL rises with the edit's strength and depth, as on a real model, with noise."""
    strength = params["attn.max_weight"] + params["mlp.max_weight"]
    depth = params.get("direction_index", layers / 2) / max(layers - 1, 1)
    refusals = max(0.0, 100 * (1.0 - 0.4 * strength) + 30 * abs(depth - 0.5))
    kl = 0.02 * strength**2 + 0.3 * (1 - depth) ** 2
    return round(refusals), kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument(
        "--storage", choices=("sqlite", "memory"), default="sqlite", help="memory: the sampler's work alone"
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")  # the heartbeat's note that it is meant for Study.optimize
    space = SearchSpace(args.layers)
    with tempfile.TemporaryDirectory() as folder:
        storage = (
            open_storage(f"sqlite:///{Path(folder) / 'study.db'}")
            if args.storage == "sqlite"
            else optuna.storages.InMemoryStorage()
        )
        study = open_study(storage, "sampler", 0, startup_trials(args.trials, None), "stand-in")
        seconds = []
        for _ in range(args.trials):
            started = time.perf_counter()
            trial = study.ask()
            params = space.sample(trial)
            seconds.append(time.perf_counter() - started)
            study.tell(trial, stand_in_scores(params, args.layers))
    print(f"{args.trials} trials, {args.layers} layers, {startup_trials(args.trials, None)} start-up trials, "
          f"{args.storage} storage")  # fmt: skip
    print("| trials | median s to draw a trial | max s |")
    print("|---|---|---|")
    for start in range(0, args.trials, args.window):
        window = seconds[start : start + args.window]
        print(f"| {start}-{start + len(window) - 1} | {statistics.median(window):.3f} | {max(window):.3f} |")


if __name__ == "__main__":
    main()

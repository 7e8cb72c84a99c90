"""Trials per hour with several workers sharing one GPU (`--workers N --gpus 0,0,...`).

A small model leaves most of a large GPU idle: one trial of a 135M model is a few hundred
milliseconds of small kernels. Several workers on the same GPU, each its own process with its own
copy of the model, fill it; they share one study through its storage. For each worker count this
runs one study of random trials (the sampler's cost is the same for all) on a model of a real
architecture's shape with random weights (see trials.py), and reports trials per hour in the
steady state, from the moment every worker has finished a trial to the first worker's last one:
what a long study is made of once every worker has loaded and compiled (paid once per study,
printed beside it as the whole run's time). The first worker begins its trials while the others
load, so a short study may end before they begin: give enough trials (200 on a 135M model). Each
worker count's trials are also taken apart into their phases (median and mean), with the time a
worker spends between two of its trials, to show what stretches when workers share the GPU, and
the long trials' share; each study's trials are written to `timeline-N-MODEL.json` in the workdir.
Where nvidia-smi runs, the GPU's utilization in the steady state too (`GPU busy`): the share of
time in which some kernel ran.
A model folder may stand for a shape: `--models src/abliterate/data/demo_model --dtype float32`
runs on a CPU.

    PYTHONPATH=src:/tmp/site python3 benchmarks/throughput.py --workdir /tmp/tp --models 135m --workers 1,2,4 --trials 200
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import torch
from bookkeeping import storage_url
from trials import SYSTEM_PROMPT, prepare_model

from abliterate.compiled import users_environment
from abliterate.storage import open_storage


def run(model: Path, workdir: Path, workers: int, args) -> dict:
    output = workdir / f"workers-{workers}-{model.name}"
    subprocess.run(["rm", "-rf", str(output)], check=True)
    gpus = ["--gpus", ",".join(["0"] * workers)] if workers > 1 and torch.cuda.is_available() else []
    command = [
        sys.executable, "-m", "abliterate", "--model", str(model), "--output", str(output),
        "--dtypes", args.dtype, "--max-response-length", str(args.max_response_length),
        "--n-trials", str(args.trials), "--n-startup-trials", str(args.trials), "--seed", "0",
        "--system-prompt", SYSTEM_PROMPT, "--select", "none", "--skip-dominated", "false",
        "--workers", str(workers), *gpus, "--storage", storage_url(args.storage, output),
    ]  # fmt: skip
    started = time.perf_counter()
    with GpuBusy() as busy:
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL, env=users_environment())
    wall = time.perf_counter() - started
    storage = open_storage(storage_url(args.storage, output))
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    (workdir / f"timeline-{workers}-{model.name}.json").write_text(json.dumps(timeline(finished)))
    return {"wall": wall, **measure(finished, workers, busy.samples)}


class GpuBusy:
    """The GPU's utilization while the block runs, sampled by nvidia-smi every 100 ms: the share of
    each sample period in which a kernel ran (any process's). Without NVIDIA's Multi-Process Service
    the GPU runs one process's kernels at a time, so workers can only fill the time one leaves idle."""

    def __enter__(self) -> GpuBusy:
        self.samples: list[tuple[datetime, float]] = []
        # The GPU the workers share: --gpus 0,0,... names this process's first visible device.
        device = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        query = [
            "nvidia-smi",
            f"--id={device}",
            "--query-gpu=timestamp,utilization.gpu",
            "--format=csv,noheader,nounits",
            "-lms",
            "100",
        ]
        self._process = (
            subprocess.Popen(query, stdout=subprocess.PIPE, text=True) if shutil.which("nvidia-smi") else None
        )
        return self

    def __exit__(self, *exc) -> None:
        if self._process is None:
            return
        self._process.terminate()
        output, _ = self._process.communicate()
        self.samples = parse_utilization(output)


def parse_utilization(output: str) -> list[tuple[datetime, float]]:
    """nvidia-smi's lines "2026/12/03 09:30:01.123, 57" as (time, percent); other lines are skipped."""
    samples = []
    for line in output.splitlines():
        stamp, _, percent = line.partition(",")
        with contextlib.suppress(ValueError):
            samples.append((datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f"), float(percent)))
    return samples


def timeline(finished: list[optuna.trial.FrozenTrial]) -> list[dict]:
    """Each trial's worker, start and end (seconds from the study's first start) and phases: to see
    whether long trials come together (a stall of the whole GPU) or one worker at a time."""
    zero = min(trial.datetime_start for trial in finished)
    return [
        {
            "number": trial.number,
            "worker": trial.user_attrs["worker"],
            "start": (trial.datetime_start - zero).total_seconds(),
            "end": (trial.datetime_complete - zero).total_seconds(),
            "seconds": trial.user_attrs.get("seconds", {}),
        }
        for trial in sorted(finished, key=lambda trial: trial.datetime_start)
    ]


def measure(
    finished: list[optuna.trial.FrozenTrial], workers: int, utilization: list[tuple[datetime, float]] = ()
) -> dict:
    """A study's finished trials: how many, the steady-state rate, and where their time went; with
    the GPU's utilization samples, its mean in the steady state."""
    by_worker: dict[str, list] = {}
    for trial in finished:
        by_worker.setdefault(trial.user_attrs["worker"], []).append(trial.datetime_complete)
    result = {"trials": len(finished), "workers_with_trials": len(by_worker), "per_hour": None}
    # Where a trial's time goes as workers are added: the phases each trial records, and the rest of
    # its duration (drawing its parameters, the storage, reading the live trials).
    phases: dict[str, list[float]] = {}
    for trial in finished:
        seconds = trial.user_attrs.get("seconds", {})
        for phase, spent in seconds.items():
            phases.setdefault(phase, []).append(spent)
        phases.setdefault("rest", []).append(trial.duration.total_seconds() - sum(seconds.values()))
    # And the time a worker spends between its trials (the callbacks, the run loop's look at the
    # storage, the next trial's creation): from one trial's end to the same worker's next start.
    by_start: dict[str, list] = {}
    for trial in sorted(finished, key=lambda trial: trial.datetime_start):
        by_start.setdefault(trial.user_attrs["worker"], []).append(trial)
    for own in by_start.values():
        for previous, following in itertools.pairwise(own):
            gap = (following.datetime_start - previous.datetime_complete).total_seconds()
            phases.setdefault("between", []).append(gap)
    result["median_s"] = {phase: round(statistics.median(spent), 4) for phase, spent in phases.items()}
    # Means too: a few long waits (a storage lock, a stall) hide from the medians.
    result["mean_s"] = {phase: round(statistics.fmean(spent), 4) for phase, spent in phases.items()}
    # How long the long trials are, and how many: the tail that separates a mean from a median.
    durations = sorted(trial.duration.total_seconds() for trial in finished)
    typical = statistics.median(durations)
    result["trial_s"] = {
        "median": round(typical, 4),
        "p90": round(durations[int(0.9 * (len(durations) - 1))], 4),
        "max": round(durations[-1], 4),
        "share_over_2x_median": round(sum(d > 2 * typical for d in durations) / len(durations), 3),
    }
    # Steady state: from the moment every worker has finished a trial to the first worker's last one.
    start = max(min(times) for times in by_worker.values())
    end = min(max(times) for times in by_worker.values())
    within = sum(start < done <= end for times in by_worker.values() for done in times)
    if len(by_worker) == workers and end > start and within:
        result["per_hour"] = within / (end - start).total_seconds() * 3600
    steady = [percent for moment, percent in utilization if start <= moment <= end]
    result["gpu_busy"] = round(statistics.fmean(steady), 1) if steady else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tp"))
    parser.add_argument("--models", default="135m", help="shapes of trials.py, or model folders")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--max-response-length", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", help="float32 for a CPU")
    parser.add_argument(
        "--storage", default="journal", help="the study's storage: journal (the tool's default) or sqlite"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"device: {device}; {args.trials} random trials a study, {args.max_response_length} new tokens, {args.dtype}, "
        f"{args.storage} storage"
    )
    rows = []
    for name in args.models.split(","):
        model = Path(name) if Path(name).is_dir() else prepare_model(name, args.workdir)
        name = model.name
        for workers in map(int, args.workers.split(",")):
            rows.append((name, workers, run(model, args.workdir, workers, args)))
            print(f"{name}, {workers} workers: {rows[-1][2]}", flush=True)  # kept if a later run dies
    print(
        "\nseconds a trial, by phase (rest: sampler, storage, the trial's own bookkeeping; between: "
        "from a worker's trial to its next)"
    )
    for name, workers, row in rows:
        print(
            f"{name}, {workers} workers: median {row['median_s']}, mean {row['mean_s']}, trial {row['trial_s']}"
        )
    print("\n| model | workers | trials | trials per hour | x one worker | GPU busy | whole run |")
    print("|---|---|---|---|---|---|---|")
    for name, workers, row in rows:
        one = next((r for n, w, r in rows if n == name and w == 1), None)
        if row["per_hour"] is None:  # the first worker ran the study out before the others began
            print(
                f"| {name} | {workers} | {row['trials']} | no steady state: raise --trials | | | {row['wall']:.0f} s |"
            )
            continue
        ratio = f"{row['per_hour'] / one['per_hour']:.2f}x" if one and one["per_hour"] else ""
        busy = f"{row['gpu_busy']:.0f}%" if row["gpu_busy"] is not None else ""
        print(
            f"| {name} | {workers} | {row['trials']} | {row['per_hour']:.0f} | {ratio} | {busy} | {row['wall']:.0f} s |"
        )


if __name__ == "__main__":
    main()

"""Several workers on one machine: one process per GPU (or several on one GPU: `--gpus 0,0`), all
sharing one study.

Each worker is an ordinary study process (`worker_process.py`: `pipeline.prepare` +
`pipeline.search`) with its own copy of the model on its own GPU. They coordinate only through the Optuna storage, exactly as
workers on other machines started with the same `--storage` and `--study-name` do. The first
worker computes the refusal directions and stores them in the study; the others start once they
are there, so every worker uses the same directions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import optuna
import torch

from abliterate.errors import UserError
from abliterate.settings import Settings
from abliterate.storage import StudyData, open_storage

SETTINGS_VARIABLE = "ABLITERATE_WORKER_SETTINGS"
NAME_VARIABLE = "ABLITERATE_WORKER_NAME"


def launch(
    settings: Settings,
    storage_url: str,
    study_name: str,
    output: Path,
    poll_seconds: float = 1.0,
    note: Callable[[str], None] = print,
) -> None:
    """Run `settings.workers` worker processes to the end of the study; `note` gets advice for the user."""
    if settings.gpus is not None and torch.cuda.device_count() == 0:
        raise UserError(
            f"--gpus {','.join(map(str, settings.gpus))} names GPUs, but none is visible; drop --gpus"
        )
    gpus = settings.gpus if settings.gpus is not None else list(range(torch.cuda.device_count()))
    devices = worker_devices(settings.workers, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    advice = sharing_advice(devices, os.environ)
    if advice:
        note(advice)
    worker_settings = settings.model_copy(
        update={
            "workers": 1, "gpus": None, "select": "none", "chat": False, "push_to_hub": None,
            "storage": storage_url, "study_name": study_name, "output": output,
        }
    )  # fmt: skip
    processes: list[subprocess.Popen] = []
    try:
        for index in range(settings.workers):
            environment = dict(os.environ)
            environment[SETTINGS_VARIABLE] = worker_settings.model_dump_json()
            environment[NAME_VARIABLE] = f"worker {index}" + (f" (GPU {devices[index]})" if devices else "")
            if devices:
                environment["CUDA_VISIBLE_DEVICES"] = devices[index]
            environment.update(thread_share(settings.workers, environment))
            processes.append(
                subprocess.Popen([sys.executable, "-m", "abliterate.worker_process"], env=environment)
            )
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


def thread_share(workers: int, environment: dict[str, str]) -> dict[str, str]:
    """Each worker's share of the CPU's threads, unless the user set them: torch and the BLAS
    libraries each take every core, so N workers would run N times as many threads as cores and
    slow each other down (two workers of the demo model on a 2-core CPU: a quarter of one
    worker's rate; benchmarks/throughput.py)."""
    if "OMP_NUM_THREADS" in environment:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"OMP_NUM_THREADS": str(max(1, cores // workers))}


def sharing_advice(devices: list[str], environment: Mapping[str, str]) -> str | None:
    """What to tell a user whose workers share a GPU while NVIDIA's Multi-Process Service is off.

    Without MPS a GPU runs one process's kernels at a time: workers only fill the time one leaves
    idle. One worker of a 135M model keeps an H200 busy 59% of the time, so four reach 1.6x its
    trials per hour; under MPS their kernels run side by side, 2.0x (benchmarks/throughput.py).
    """
    shared = sorted({device for device in devices if devices.count(device) > 1})
    if not shared or mps_running(environment):
        return None
    return (
        f"workers share GPU {', '.join(shared)} but NVIDIA MPS is not running, so the GPU runs one worker's "
        "kernels at a time (4 workers of a 135M model: 1.6x one worker's trials per hour, under MPS 2.0x); "
        "for more, start `nvidia-cuda-mps-control -d` before the study"
    )


def mps_running(environment: Mapping[str, str]) -> bool:
    """Whether an MPS control daemon listens: its pipe lies in CUDA_MPS_PIPE_DIRECTORY (default /tmp/nvidia-mps)."""
    return (Path(environment.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps") / "control").exists()


def worker_devices(workers: int, gpus: list[int], parent_visible: str | None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each worker, or none at all when there are no GPUs.

    `gpus` are the indices this process sees: under a CUDA_VISIBLE_DEVICES of its own they point
    into that list (as torch numbers the devices), so they are translated, not passed on as they are.
    """
    if gpus and workers > len(gpus):
        shared = ",".join(map(str, sorted((gpus * workers)[:workers])))  # the GPUs in turn
        raise UserError(
            f"--workers {workers} needs one GPU each, but only {len(gpus)} are given ({gpus}); "
            f"list a GPU more than once to share it (--gpus {shared})"
        )
    chosen = gpus[:workers]
    if parent_visible is None:
        return [str(index) for index in chosen]
    visible = [device.strip() for device in parent_visible.split(",") if device.strip()]
    outside = [index for index in chosen if not 0 <= index < len(visible)]
    if outside:
        seen = f"GPUs 0 to {len(visible) - 1}" if len(visible) > 1 else "GPU 0" if visible else "no GPU"
        raise UserError(
            f"--gpus {outside[0]} is out of range: CUDA_VISIBLE_DEVICES={parent_visible!r} lets this process "
            f"see {seen}, and --gpus counts within that list; choose from it or widen CUDA_VISIBLE_DEVICES"
        )
    return [visible[index] for index in chosen]


def _wait_for_directions(
    first: subprocess.Popen, storage_url: str, study_name: str, poll_seconds: float
) -> None:
    """Hold the other workers back until the first has stored the directions (or has failed)."""
    storage = open_storage(storage_url)
    while first.poll() is None:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
            stored = StudyData(study)
            if stored.has_directions and stored.baseline_refusals is not None:
                return
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(poll_seconds)
    if first.returncode != 0:
        raise UserError(f"the first worker stopped with exit code {first.returncode}; see its messages above")

"""Several workers on one machine: one process per GPU (or several on one GPU: `--gpus 0,0`), all
sharing one study.

Each worker is an ordinary study process (`worker_process.py`: `pipeline.prepare` +
`pipeline.search`) with its own copy of the model on its own GPU. They coordinate only through the Optuna storage, exactly as
workers on other machines started with the same `--storage` and `--study-name` do. The first
worker computes the refusal directions and counts the original model's refusals, and stores both
in the study; every worker then uses the same directions.

The others start once the first has loaded its model (a mistake in the model or the prompts shows
once, from the first, through a pipe it signals on), load theirs while it computes the directions
and the baseline, and wait for those in the study before their first trial. A first worker that
fails before storing them stops the others.
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

from abliterate.compiled import users_environment
from abliterate.errors import UserError
from abliterate.settings import Settings
from abliterate.storage import StudyData, open_storage

SETTINGS_VARIABLE = "ABLITERATE_WORKER_SETTINGS"
NAME_VARIABLE = "ABLITERATE_WORKER_NAME"
# The first worker's end of a pipe: it writes a byte there once its model has loaded.
LOADED_FD_VARIABLE = "ABLITERATE_WORKER_LOADED_FD"
# Set for the other workers: they wait for the first one's directions and baseline in the study.
FOLLOWS_VARIABLE = "ABLITERATE_WORKER_FOLLOWS"


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

    def start(index: int, role: dict[str, str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
        environment = users_environment()
        environment[SETTINGS_VARIABLE] = worker_settings.model_dump_json()
        environment[NAME_VARIABLE] = f"worker {index}" + (f" (GPU {devices[index]})" if devices else "")
        if devices:
            environment["CUDA_VISIBLE_DEVICES"] = devices[index]
        environment.update(thread_share(settings.workers, environment))
        environment.update(role)
        command = [sys.executable, "-m", "abliterate.worker_process"]
        return subprocess.Popen(command, env=environment, pass_fds=pass_fds)

    processes: list[subprocess.Popen] = []
    loaded_read, loaded_write = os.pipe()
    try:
        try:
            processes.append(start(0, {LOADED_FD_VARIABLE: str(loaded_write)}, pass_fds=(loaded_write,)))
        finally:
            os.close(loaded_write)  # the first worker holds the only other copy: its exit closes the pipe
        _wait_until_loaded(processes[0], loaded_read)
        processes += [start(index, {FOLLOWS_VARIABLE: "1"}) for index in range(1, settings.workers)]
        _wait_for_directions(processes[0], storage_url, study_name, poll_seconds)
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        # The terminal sends Ctrl-C to the workers too; let them record their trials and stop.
        for process in processes:
            process.wait()
        raise
    except BaseException:  # the launcher itself failed: no worker goes on without it
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait()
        raise
    finally:
        os.close(loaded_read)
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


def announce_loaded(descriptor: int) -> None:
    """The first worker's word to the launcher that its model has loaded (see `_wait_until_loaded`)."""
    os.write(descriptor, b"1")
    os.close(descriptor)


def wait_for_first_worker(study: optuna.Study, poll_seconds: float = 0.5) -> None:
    """Hold a joining worker until the first one has stored the directions and counted the baseline
    (the launcher stops this worker should the first one fail before that)."""
    stored = StudyData(study)
    while not stored.ready_for_trials:
        time.sleep(poll_seconds)


def _wait_until_loaded(first: subprocess.Popen, loaded_read: int) -> None:
    """Block until the first worker has loaded its model, or raise if it stopped with an error."""
    if os.read(loaded_read, 1):
        return
    # The pipe closed without a word: the first worker ended before its model loaded.
    code = first.wait()
    if code != 0:
        raise UserError(f"the first worker stopped with exit code {code}; see its messages above")


def _wait_for_directions(
    first: subprocess.Popen, storage_url: str, study_name: str, poll_seconds: float
) -> None:
    """Wait until the first worker has stored the directions and the baseline; should it stop before
    that, raise (`launch` then stops the others, which would wait for ever)."""
    storage = open_storage(storage_url)
    while True:
        try:
            if StudyData(optuna.load_study(study_name=study_name, storage=storage)).ready_for_trials:
                return
        except KeyError:  # the study does not exist yet
            pass
        code = first.poll()
        if code is not None:
            break
        time.sleep(poll_seconds)
    raise UserError(
        f"the first worker stopped (exit code {code}) before it stored the refusal directions "
        "and the baseline; see its messages above"
    )

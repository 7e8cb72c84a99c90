"""The `--workers` launcher: which GPU each process gets (also under a CUDA_VISIBLE_DEVICES of the
parent's own), when each starts, and how their lines are told apart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import optuna
import pytest
import torch

from abliterate import worker_process, workers
from abliterate.errors import UserError
from abliterate.settings import Settings
from abliterate.storage import StudyData
from abliterate.workers import worker_devices


@pytest.mark.parametrize(
    ("workers", "gpus", "parent_visible", "expected"),
    [
        (2, [0, 1], None, ["0", "1"]),
        (2, [0, 1], "2,3", ["2", "3"]),  # the indices point into the parent's list
        (2, [1, 0], "2, 3", ["3", "2"]),
        (1, [1], "GPU-a1b2,GPU-c3d4", ["GPU-c3d4"]),  # UUIDs are passed on as they are
        (2, [0, 1, 2], "5,6,7", ["5", "6"]),  # more GPUs than workers: the first ones
        (3, [], None, []),  # no GPUs: the workers share the CPU
        (3, [0, 0, 1], None, ["0", "0", "1"]),  # a GPU listed twice takes two workers
        (2, [1, 1], "4,5", ["5", "5"]),
    ],
)
def test_each_worker_gets_its_device(workers, gpus, parent_visible, expected):
    assert worker_devices(workers, gpus, parent_visible) == expected


def test_more_workers_than_gpus_is_an_error():
    with pytest.raises(
        UserError,
        match=r"^--workers 3 needs one GPU each, but only 2 are given \(\[0, 1\]\); "
        r"list a GPU more than once to share it \(--gpus 0,0,1\)$",
    ):
        worker_devices(3, [0, 1], None)


@pytest.mark.parametrize(
    ("gpus", "parent_visible", "seen", "bad"),
    [
        ([0, 2], "2,3", "GPUs 0 to 1", 2),
        ([1], "4", "GPU 0", 1),
        ([0], "", "no GPU", 0),
        ([-1], "2,3", "GPUs 0 to 1", -1),  # not Python's last item
    ],
)
def test_an_index_past_the_parents_list_is_one_clear_error(gpus, parent_visible, seen, bad):
    with pytest.raises(UserError) as error:
        worker_devices(len(gpus), gpus, parent_visible)
    assert str(error.value) == (
        f"--gpus {bad} is out of range: CUDA_VISIBLE_DEVICES={parent_visible!r} lets this process see {seen}, "
        "and --gpus counts within that list; choose from it or widen CUDA_VISIBLE_DEVICES"
    )


class FakeWorker:
    """A worker process as the launcher sees it: the first one says it loaded unless told to fail
    first, and has ended with `code`; the others run until they are terminated, then end with it."""

    started: ClassVar[list[FakeWorker]] = []
    loads = True
    code = 0

    def __init__(self, command, env, pass_fds=()):
        self.env = env
        self.terminated = False
        FakeWorker.started.append(self)
        if workers.LOADED_FD_VARIABLE in env and self.loads:
            os.write(int(env[workers.LOADED_FD_VARIABLE]), b"1")

    def poll(self):
        following = workers.FOLLOWS_VARIABLE in self.env
        return None if following and not self.terminated else self.code

    def wait(self):
        return self.code

    def terminate(self):
        self.terminated = True


@pytest.fixture
def fake_workers(monkeypatch) -> type[FakeWorker]:
    monkeypatch.setattr(FakeWorker, "started", [])
    monkeypatch.setattr(workers.subprocess, "Popen", FakeWorker)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return FakeWorker


def test_launch_gives_each_worker_its_device_from_the_parents_list(monkeypatch, tmp_path: Path, fake_workers):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's: kept
    monkeypatch.setattr(workers.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(workers, "_wait_for_directions", lambda *args: None)
    workers.launch(Settings(workers=2, gpus=[1, 0]), "sqlite://", "study", tmp_path)
    started = [
        (w.env["CUDA_VISIBLE_DEVICES"], w.env[workers.NAME_VARIABLE], w.env["OMP_NUM_THREADS"])
        for w in fake_workers.started
    ]
    assert started == [("7", "worker 0 (GPU 7)", "3"), ("6", "worker 1 (GPU 6)", "3")]


def test_the_others_start_once_the_first_has_loaded_and_then_wait_for_it(monkeypatch, tmp_path, fake_workers):
    waited_with = []
    monkeypatch.setattr(workers.torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(
        workers,
        "_wait_for_directions",
        lambda first, *args: waited_with.append((first, [*fake_workers.started])),
    )
    workers.launch(Settings(workers=3), "sqlite://", "study", tmp_path)
    first, *others = fake_workers.started
    assert workers.LOADED_FD_VARIABLE in first.env and workers.FOLLOWS_VARIABLE not in first.env
    assert all(
        w.env[workers.FOLLOWS_VARIABLE] == "1" and workers.LOADED_FD_VARIABLE not in w.env for w in others
    )
    assert waited_with == [(first, [first, *others])]  # the others ran while the first finished its part


def test_a_first_worker_that_fails_to_load_starts_no_other(monkeypatch, tmp_path, fake_workers):
    monkeypatch.setattr(workers.torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(fake_workers, "loads", False)
    monkeypatch.setattr(fake_workers, "code", 1)
    with pytest.raises(
        UserError, match=r"^the first worker stopped with exit code 1; see its messages above$"
    ):
        workers.launch(Settings(workers=3), "sqlite://", "study", tmp_path)
    assert len(fake_workers.started) == 1  # its error shows once, not once a worker


def test_a_first_worker_that_fails_before_the_directions_stops_the_others(
    monkeypatch, tmp_path, fake_workers
):
    monkeypatch.setattr(workers.torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(fake_workers, "code", 1)  # loads, then stops before storing anything
    with pytest.raises(
        UserError, match=r"^the first worker stopped \(exit code 1\) before it stored the refusal"
    ):
        workers.launch(
            Settings(workers=3), f"sqlite:///{tmp_path / 'study.db'}", "study", tmp_path, poll_seconds=0
        )
    first, *others = fake_workers.started
    assert len(others) == 2 and all(w.terminated for w in others) and not first.terminated


def test_a_launcher_that_fails_stops_its_workers(monkeypatch, tmp_path, fake_workers):
    def storage_fails(*args):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(workers.torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(workers, "_wait_for_directions", storage_fails)
    with pytest.raises(RuntimeError, match="database is locked"):
        workers.launch(Settings(workers=3), "sqlite://", "study", tmp_path)
    _, *others = fake_workers.started
    assert len(others) == 2 and all(w.terminated for w in others)  # none runs on without its launcher


def test_a_joining_worker_waits_until_the_study_has_directions_and_baseline(monkeypatch):
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    stored = StudyData(study)
    polls = []

    def first_worker_progresses(seconds):  # each poll, the first worker stores one thing more
        polls.append(seconds)
        if len(polls) == 1:
            stored.directions = torch.ones(2, 4)
        else:
            stored.record_baseline(10, 9, {})

    monkeypatch.setattr(workers.time, "sleep", first_worker_progresses)
    workers.wait_for_first_worker(study, poll_seconds=0.25)
    assert polls == [0.25, 0.25] and stored.ready_for_trials
    workers.wait_for_first_worker(study)  # a study ready from the start: no wait
    assert len(polls) == 2


@pytest.mark.parametrize(
    ("cores", "workers_", "threads"), [(16, 4, "4"), (16, 3, "5"), (2, 4, "1"), (8, 1, "8")]
)
def test_workers_share_the_cpus_threads(monkeypatch, cores, workers_, threads):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert workers.thread_share(workers_, {}) == {"OMP_NUM_THREADS": threads}
    assert workers.thread_share(workers_, {"OMP_NUM_THREADS": "2"}) == {}  # the user's choice stands


def test_gpus_named_where_none_is_visible_is_one_line(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(workers.torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserError, match=r"^--gpus 0,1 names GPUs, but none is visible; drop --gpus$"):
        workers.launch(Settings(workers=2, gpus=[0, 1]), "sqlite://", "study", tmp_path)


def test_every_line_a_worker_prints_starts_with_its_name(capsys):
    console = worker_process.LabelledConsole("worker 1 (GPU 3): ")
    console.print("loading the built-in demo model")
    console.print("trial    4: refusals   2/10, KL 0.0312")
    assert capsys.readouterr().err.splitlines() == [
        "worker 1 (GPU 3): loading the built-in demo model",
        "worker 1 (GPU 3): trial    4: refusals   2/10, KL 0.0312",
    ]


def test_workers_sharing_a_gpu_without_mps_are_told_how_to_run_side_by_side(tmp_path: Path):
    without = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    advice = workers.sharing_advice(["3", "3", "5"], without)
    assert advice.startswith("workers share GPU 3 but NVIDIA MPS is not running")
    assert "nvidia-cuda-mps-control -d" in advice
    assert workers.sharing_advice(["3", "5"], without) is None  # one worker a GPU: nothing to share
    assert workers.sharing_advice([], without) is None  # the CPU
    (tmp_path / "control").touch()  # the daemon's pipe: MPS is on
    assert workers.mps_running(without)
    assert workers.sharing_advice(["3", "3"], without) is None


def test_launch_passes_the_sharing_advice_to_its_note(monkeypatch, tmp_path: Path, fake_workers):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    monkeypatch.setattr(workers.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(workers, "_wait_for_directions", lambda *args: None)
    notes = []
    workers.launch(Settings(workers=2, gpus=[0, 0]), "sqlite://", "study", tmp_path, note=notes.append)
    assert len(notes) == 1 and notes[0].startswith("workers share GPU 0 but NVIDIA MPS is not running")


def test_the_first_worker_says_it_loaded_and_a_joining_one_waits_only_while_needed(monkeypatch, capsys):
    console = worker_process.LabelledConsole("worker 1: ")
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    monkeypatch.delenv(workers.LOADED_FD_VARIABLE, raising=False)
    monkeypatch.delenv(workers.FOLLOWS_VARIABLE, raising=False)
    assert worker_process._role(console) is None  # a study of one process: nothing to tell or wait for

    read, write = os.pipe()
    monkeypatch.setenv(workers.LOADED_FD_VARIABLE, str(write))
    worker_process._role(console)(study)
    assert os.read(read, 1) == b"1" and os.read(read, 1) == b""  # said, and its end closed
    os.close(read)

    monkeypatch.delenv(workers.LOADED_FD_VARIABLE)
    monkeypatch.setenv(workers.FOLLOWS_VARIABLE, "1")
    StudyData(study).directions = torch.ones(2, 4)
    StudyData(study).record_baseline(10, 9)
    worker_process._role(console)(study)  # the first worker's part is done: no wait, no message
    assert capsys.readouterr().err == ""


def test_the_variables_handed_to_workers_are_not_taken_for_settings():
    from abliterate.settings import NOT_SETTINGS

    handed = {value for name, value in vars(workers).items() if name.endswith("_VARIABLE")}
    assert len(handed) == 4 and handed <= NOT_SETTINGS


@pytest.mark.parametrize("chosen", [None, "/home/user/inductor"])
def test_workers_get_the_compile_cache_place_as_the_user_set_it(monkeypatch, tmp_path, fake_workers, chosen):
    # Importing torch._dynamo sets the variable to torch's default: a worker must not take that for
    # the user's choice, or it would compile into /tmp instead of the study's folder.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", chosen or "/tmp/torchinductor_user")
    monkeypatch.setattr("abliterate.CHOSEN_COMPILE_CACHE", chosen)
    monkeypatch.setattr(workers, "_wait_for_directions", lambda *args: None)
    workers.launch(Settings(workers=2), "sqlite://", "study", tmp_path)
    assert [worker.env.get("TORCHINDUCTOR_CACHE_DIR") for worker in fake_workers.started] == [chosen, chosen]

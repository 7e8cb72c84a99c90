"""The `--workers` launcher: which GPU each process gets (also under a CUDA_VISIBLE_DEVICES of the
parent's own), and how their lines are told apart."""

from pathlib import Path

import pytest

from abliterate import worker_process, workers
from abliterate.errors import UserError
from abliterate.settings import Settings
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


def test_launch_gives_each_worker_its_device_from_the_parents_list(monkeypatch, tmp_path: Path):
    started = []

    class FakeProcess:
        def __init__(self, command, env):
            started.append((env["CUDA_VISIBLE_DEVICES"], env[workers.NAME_VARIABLE], env["OMP_NUM_THREADS"]))

        def wait(self):
            return 0

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's: kept
    monkeypatch.setattr(workers.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(workers.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(workers, "_wait_for_directions", lambda *args: None)
    workers.launch(Settings(workers=2, gpus=[1, 0]), "sqlite://", "study", tmp_path)
    assert started == [("7", "worker 0 (GPU 7)", "3"), ("6", "worker 1 (GPU 6)", "3")]


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


def test_launch_passes_the_sharing_advice_to_its_note(monkeypatch, tmp_path: Path):
    class FakeProcess:
        def __init__(self, command, env):
            pass

        def wait(self):
            return 0

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(workers.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(workers.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(workers, "_wait_for_directions", lambda *args: None)
    notes = []
    workers.launch(Settings(workers=2, gpus=[0, 0]), "sqlite://", "study", tmp_path, note=notes.append)
    assert len(notes) == 1 and notes[0].startswith("workers share GPU 0 but NVIDIA MPS is not running")

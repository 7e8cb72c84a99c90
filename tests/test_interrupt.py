"""Killed runs lose nothing: real subprocesses, SIGKILL at several moments, then the same command again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import transformers
from optuna.trial import TrialState

from abliterate.storage import folder_holds_study, folder_storage_url, open_storage

pytestmark = pytest.mark.slow

N_TRIALS = 10


@pytest.fixture
def model(tiny_model_folder: Path) -> Path:
    return tiny_model_folder


def command(model: Path, output: Path) -> list[str]:
    return [
        sys.executable, "-m", "abliterate", "--model", str(model), "--output", str(output),
        "--n-trials", str(N_TRIALS), "--n-startup-trials", "4", "--select", "knee", "--max-response-length", "6",
        "--harmful-train-split", "train[:16]", "--harmless-train-split", "train[:16]",
        "--harmful-eval-split", "eval[:6]", "--harmless-eval-split", "eval[:6]",
    ]  # fmt: skip


def start(model: Path, output: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command(model, output), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )


def signal_when(
    process: subprocess.Popen, marker: str, sig: int = signal.SIGKILL, delay: float = 0.0
) -> list[str]:
    """Read stderr until a line containing `marker` appears, then send `sig`; returns the lines read."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if marker in line:
            time.sleep(delay)
            process.send_signal(sig)
            break
    _, remaining = process.communicate(timeout=120)
    return lines + remaining.splitlines(keepends=True)


def stored_trials(output: Path) -> list[optuna.trial.FrozenTrial]:
    if not folder_holds_study(output):
        return []
    storage = open_storage(folder_storage_url(output))
    names = optuna.get_all_study_names(storage)
    if not names:
        return []
    return optuna.load_study(study_name=names[0], storage=storage).get_trials(deepcopy=False)


def complete(trials) -> dict[int, tuple]:
    return {trial.number: tuple(trial.values) for trial in trials if trial.state == TrialState.COMPLETE}


def assert_output_complete_or_absent(output: Path) -> None:
    saved = output / "model"
    if saved.exists():
        transformers.AutoModelForCausalLM.from_pretrained(saved)  # loads: complete
        assert (saved / "README.md").is_file() and (saved / "tokenizer_config.json").is_file()


def test_sigkill_at_every_stage_loses_no_finished_trial(model: Path, tmp_path: Path):
    output = tmp_path / "run"
    kept: dict[int, tuple] = {}
    # While loading and capturing residuals, in the middle of the study, and while saving.
    for marker, delay in (("loading", 0.5), ("trial    2:", 0.05), ("trial    5:", 0.0)):
        signal_when(start(model, output), marker, delay=delay)
        now = complete(stored_trials(output))
        assert kept.items() <= now.items(), "a finished trial was lost or changed"
        assert len(now) < N_TRIALS
        kept = now
        assert_output_complete_or_absent(output)
    # The study is finished: now kill while the result is being saved.
    finish = subprocess.run(command(model, output), capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr
    first_saved = (output / "model" / "model.safetensors").stat().st_mtime_ns
    signal_when(start(model, output), "Pareto front")
    assert_output_complete_or_absent(output)
    assert not list(output.glob(".model.partial-*")) or (output / "model").exists()

    final = subprocess.run(command(model, output), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    trials = stored_trials(output)
    finished = complete(trials)
    assert len(finished) == N_TRIALS
    assert kept.items() <= finished.items()
    assert all(trial.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL) for trial in trials)
    assert (output / "model" / "model.safetensors").stat().st_mtime_ns >= first_saved
    assert not list(output.glob(".model.*-*")), "leftovers of an interrupted save"


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(model: Path, tmp_path: Path):
    output = tmp_path / "run"
    process = start(model, output)
    lines = signal_when(process, "trial    1:", sig=signal.SIGINT)
    assert process.returncode == 130
    assert "run the same command again to resume" in "".join(lines)
    assert not any("Traceback" in line for line in lines), "".join(lines)
    assert len(complete(stored_trials(output))) >= 2


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")

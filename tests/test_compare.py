"""`abliterate evaluate`: any model scored against its original, on the scale of a study."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import save_tiny_model

from abliterate.cli import main
from abliterate.storage import folder_storage_url, open_storage

EVAL = [
    "--harmful-eval-split", "eval[:4]", "--harmless-eval-split", "eval[:4]", "--max-response-length", "4",
]  # fmt: skip


def test_evaluate_gives_a_saved_trial_the_scores_its_study_gave_it(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = save_tiny_model(tmp_path / "tiny")
    study_argv = [
        "--model", str(source), *EVAL, "--harmful-train-split", "train[:8]", "--harmless-train-split", "train[:8]",
        "--n-trials", "3", "--n-startup-trials", "3", "--output", str(tmp_path / "o"),
    ]  # fmt: skip
    assert main([*study_argv, "--select", "none"]) == 0
    study = optuna.load_study(study_name="tiny", storage=open_storage(folder_storage_url(tmp_path / "o")))
    # A trial that edits the model: the warm starts weigh every layer.
    trial = max(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.values[1])
    assert trial.values[1] > 0
    assert main([*study_argv, "--select", f"trial:{trial.number}"]) == 0
    capsys.readouterr()
    saved = tmp_path / "o" / "model"
    assert main(["evaluate", "--model", str(saved), "--original", str(source), *EVAL]) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "evaluation-o.json").read_text())  # named by the study's folder
    assert written["refusals"] == trial.values[0] and written["kl"] == trial.values[1]
    assert written["original_refusals"] == study.user_attrs["baseline_refusals"]
    assert written["eval_prompts"] == 4 and written["original"] == str(source)
    assert f"{int(trial.values[0])}/4" in out and "written to evaluation-o.json" in out


def test_evaluating_the_original_against_itself_is_no_change(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = save_tiny_model(tmp_path / "tiny")
    target = tmp_path / "scores" / "same.json"
    assert (
        main(["evaluate", "--model", str(source), "--original", str(source), *EVAL, "--json", str(target)])
        == 0
    )
    written = json.loads(target.read_text())
    assert written["kl"] == 0.0 and written["refusals"] == written["original_refusals"]
    assert not list(target.parent.glob("*.partial"))


@pytest.mark.parametrize(
    ("argv", "message", "code"),
    [
        (["--model", "x"], "the following arguments are required: --original; see `abliterate evaluate --help`", 2),
        (["--original", "{tiny}", "--n-trials", "3"],
         "unrecognized arguments: --n-trials 3; see `abliterate evaluate --help`", 2),
        # Scoring reads the eval prompts only: the train prompts find directions, which it has none of.
        (["--original", "{tiny}", "--harmful-train-split", "train[:8]"],
         "unrecognized arguments: --harmful-train-split train[:8]; see `abliterate evaluate --help`", 2),
        (["--original", "{tiny}"], "abliterate evaluate needs --model: the model to score (a folder or hub id)", 1),
        # Where the scores go is checked before any model loads, not after the evaluation.
        (["--model", "{tiny}", "--original", "{tiny}", "--json", "{tiny}/config.json/x.json"],
         "--json {tiny}/config.json/x.json: {tiny}/config.json is a file, not a folder; choose another --json", 1),
        (["--model", "{tiny}", "--original", "{tiny}", "--json", "{tiny}"], "--json {tiny} is a folder; name a file", 1),
    ],
)  # fmt: skip
def test_evaluate_mistakes_are_one_line(argv, message, code, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = str(save_tiny_model(tmp_path / "tiny"))
    assert main(["evaluate", *[arg.replace("{tiny}", tiny) for arg in argv]]) == code
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"abliterate: error: {message.replace('{tiny}', tiny)}"
    )

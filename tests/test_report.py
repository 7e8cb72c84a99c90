"""The study's report: pareto.png and report.html after every study, sample answers, and `abliterate report`."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import optuna
from conftest import save_tiny_model, tiny_study

from abliterate.cli import main
from abliterate.report import load_samples
from abliterate.storage import folder_storage_url, open_storage

FAST = tiny_study(3)


def test_a_study_writes_its_report_with_the_front_and_sample_answers(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = save_tiny_model(tmp_path / "tiny")
    output = tmp_path / "o"
    assert main(["--model", str(source), *FAST, "--select", "min-kl", "--output", str(output)]) == 0
    err = capsys.readouterr().err
    assert f"report: {output / 'report.html'} and {output / 'pareto.png'}" in err
    # Two harmful prompts and one harmless, each answered by both models, on the console too.
    assert err.count("harmful prompt") == 2 and err.count("harmless prompt") == 1
    assert err.count("  original: ") == 3 and err.count("  saved:    ") == 3
    samples = load_samples(output)
    assert [sample.kind for sample in samples] == ["harmful", "harmful", "harmless"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("report.html", "pareto.png", "samples.json"):  # as readable as any new file, not private
        assert (output / name).stat().st_mode & 0o777 == 0o666 & ~umask
    png = (output / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    page = (output / "report.html").read_text()
    study = optuna.load_study(study_name="tiny", storage=open_storage(folder_storage_url(output)))
    saved = min(study.best_trials, key=lambda trial: (trial.values[1], trial.values[0]))
    assert f"<h2>Saved trial {saved.number}</h2>" in page and "(saved)" in page and "(knee)" in page
    assert "data:image/png;base64," in page  # self-contained: the plot is inside the page
    assert "Ablation weight per layer" in page and "Time per trial" in page
    for sample in samples:
        assert html.escape(sample.original) in page and html.escape(sample.saved) in page
        assert html.escape(sample.prompt) in page
    for trial in study.best_trials:
        assert re.search(
            rf"<td>{trial.number}( \(saved\))?( \(knee\))?</td><td>{int(trial.values[0])}/4</td>", page
        )

    assert f"<td>original model</td><td>{study.user_attrs['baseline_refusals']}/4</td><td>0</td>" in page

    # Rebuilt from the study and samples.json alone: the same page.
    (output / "report.html").unlink()
    (output / "pareto.png").unlink()
    assert main(["report", "--output", str(output)]) == 0
    assert (output / "report.html").read_text() == page
    assert (output / "pareto.png").is_file()


def test_a_study_that_saves_nothing_still_reports_its_front(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = save_tiny_model(tmp_path / "tiny")
    assert main(["--model", str(source), *FAST, "--select", "none", "--output", str(tmp_path / "o")]) == 0
    page = (tmp_path / "o" / "report.html").read_text()
    assert "Pareto front" in page and "Saved trial" not in page and "Sample answers" not in page


def test_report_of_a_folder_without_a_study_is_one_line(tmp_path: Path, capsys):
    assert main(["report", "--output", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"abliterate: error: {tmp_path} holds no study; give the study's --storage and --study-name"
    )


def test_report_of_a_storage_that_is_not_there_is_one_line_and_makes_no_file(tmp_path: Path, capsys):
    for url, path in (
        (f"sqlite:///{tmp_path}/nope.db", tmp_path / "nope.db"),
        (f"journal:{tmp_path}/nope.journal", tmp_path / "nope.journal"),
    ):
        assert main(["report", "--output", str(tmp_path), "--storage", url]) == 1
        assert capsys.readouterr().err.strip() == (
            f"abliterate: error: there is no {path}; give the --storage a study was run with"
        )
        assert not path.exists()

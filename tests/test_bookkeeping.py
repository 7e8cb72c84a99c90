"""benchmarks/bookkeeping.py: the run loop's own time per trial, by storage."""

import importlib.util
from pathlib import Path

import optuna
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("bookkeeping", BENCHMARKS / "bookkeeping.py")
bookkeeping = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bookkeeping)


def test_every_storage_runs_the_same_study(tmp_path: Path):
    studies = {}
    for kind in ("sqlite", "journal"):
        (tmp_path / kind).mkdir()
        milliseconds, studies[kind] = bookkeeping.measure(
            kind, trials=8, startup=4, layers=6, folder=tmp_path / kind
        )
        assert milliseconds > 0
    sqlite, journal = (
        studies[kind].get_trials(states=(optuna.trial.TrialState.COMPLETE,)) for kind in studies
    )
    assert len(sqlite) == len(journal) == 8
    assert [t.params for t in sqlite] == [t.params for t in journal]  # TPE's trials too, not only random ones
    assert [t.values for t in sqlite] == [t.values for t in journal]
    assert (tmp_path / "sqlite" / "study.db").is_file() and (tmp_path / "journal" / "study.journal").is_file()


def test_an_unknown_storage_kind_is_named():
    with pytest.raises(ValueError, match="unknown storage kind 'redis'"):
        bookkeeping.storage_url("redis", Path("."))

"""Chat: a saved folder without a study, streamed replies, /original and /reset, and --chat after a study."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import save_tiny_model, tiny_study
from rich.console import Console

from abliterate.chat import Chat, chat_loop
from abliterate.cli import main
from abliterate.model import load_chat_model

FAST = tiny_study(2)


@pytest.fixture
def saved(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A tiny source model and a study's saved result of it."""
    monkeypatch.chdir(tmp_path)
    source = save_tiny_model(tmp_path / "tiny")
    assert main(["--model", str(source), *FAST, "--select", "min-kl", "--output", str(tmp_path / "o")]) == 0
    return source, tmp_path / "o" / "model"


def test_chat_opens_a_saved_folder_without_a_study_and_switches_to_its_original(saved, monkeypatch, capsys):
    source, folder = saved
    before = sorted(path.name for path in folder.parent.iterdir())
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/original\nhello\n/reset\n/what\nhello\n"))
    assert main(["chat", str(folder), "--max-new-tokens", "5", "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert f"loading {folder}" in out and f"loading {source}" in out  # the original named by abliterate.json
    assert "now answering: the original model (the history stays)" in out
    assert "history cleared" in out and "unknown command /what" in out
    assert "trial" not in out and "refusals" not in out  # nothing scored
    assert sorted(path.name for path in folder.parent.iterdir()) == before  # nothing written


def test_a_folder_that_names_no_original_chats_and_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    folder = save_tiny_model(tmp_path / "plain")
    monkeypatch.setattr("sys.stdin", io.StringIO("/original\nhello\n"))
    assert main(["chat", str(folder), "--max-new-tokens", "3"]) == 0
    assert "the original model is not known here; pass --original" in capsys.readouterr().out


def test_replies_stream_and_join_the_history(tmp_path):
    model = load_chat_model(str(save_tiny_model(tmp_path / "tiny")), dtypes=["float32"], device_map="cpu")
    console = Console(file=io.StringIO(), highlight=False)
    chat = Chat(lambda: model, None, console, max_new_tokens=6)
    pieces = list(
        model.stream(dict(model.tokenizer(["<|user|>hi<|end|><|assistant|>"], return_tensors="pt")), 6)
    )
    assert len(pieces) >= 1
    lines = iter(["hello", "again", ""])
    chat_loop(chat, read=lambda prompt: next(lines))
    assert [message["role"] for message in chat.history] == ["user", "assistant", "user", "assistant"]
    # The reply the user saw is the reply kept: the streamed text, and greedy generation's own.
    batch = model.tokenizer(
        [model.format_conversation(chat.history[:1])], return_tensors="pt", add_special_tokens=False
    )
    assert chat.history[1]["content"] == model.generate(dict(batch), 6)[0].strip()


def test_chat_after_a_study_uses_the_same_code_and_original_resets_the_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = save_tiny_model(tmp_path / "tiny")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/original\nhello\n/original\nhello\n"))
    argv = ["--model", str(source), *FAST, "--select", "knee", "--chat", "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (
        out.count("now answering: the original model") == 1
        and out.count("now answering: the result model") == 1
    )


def test_chat_with_nothing_saved_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--select", "none", "--chat"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--chat talks to the saved model, but --select none saves none; pick a trial")
    )

"""Reasoning models: a thinking block is not the answer, and `--enable-thinking` reaches the template."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import tiny_model, tiny_tokenizer

from abliterate.cli import main
from abliterate.judge import RefusalDetector, visible_answer
from abliterate.model import load_chat_model
from abliterate.storage import folder_storage_url, open_storage

THINK = ("<think>", "</think>")
# Qwen3's convention, reduced: `enable_thinking=false` writes an empty block for the model.
THINKING_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# DeepSeek-R1's convention: the generation prompt opens the block itself.
OPENING_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)


@pytest.mark.parametrize(
    ("response", "opened", "answer"),
    [
        ("<think>I cannot decide.</think>Here is how.", False, "Here is how."),
        ("<think>a</think>One.<think>b</think> Two.", False, "One. Two."),
        ("<think>I'm sorry, I can't, or can I", False, ""),  # still thinking: no answer yet
        ("Sure.<think>unfinished", False, "Sure."),
        ("I should refuse.</think>Fine, here it is.", True, "Fine, here it is."),
        ("I should refuse, I cannot", True, ""),
        ("No block at all.", False, "No block at all."),
    ],
)
def test_the_answer_is_what_follows_the_thinking(response, opened, answer):
    assert visible_answer(response, THINK, opened) == answer


def test_a_refusal_weighed_while_thinking_is_not_a_refusal():
    detector = RefusalDetector(["I cannot", "I'm sorry"], THINK)
    assert not detector("<think>I'm sorry, but maybe I cannot... no, it is fine.</think>Step one: ...")
    assert detector("<think>This is harmful.</think>I'm sorry, I can't help with that.")
    opened = RefusalDetector(["I cannot"], THINK, opened=True)
    assert not opened("I cannot say yet.</think>Sure: ...") and opened("Hmm.</think>I cannot help.")
    assert RefusalDetector(["I cannot"])("<think>I cannot</think>ok")  # a model without thinking: all counts


def save_reasoning_model(folder: Path, template: str) -> Path:
    tiny_model("llama").save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


def test_thinking_markers_and_enable_thinking_come_from_the_template(tmp_path):
    folder = save_reasoning_model(tmp_path / "qwen3-like", THINKING_TEMPLATE)
    default = load_chat_model(str(folder), dtypes=["float32"], device_map="cpu")
    assert default.thinking_markers == THINK and not default.prompt_opens_thinking
    assert "<think>" not in default.format("hi")
    off = load_chat_model(str(folder), dtypes=["float32"], device_map="cpu", enable_thinking=False)
    assert off.format("hi").endswith("<|assistant|><think>\n\n</think>\n\n") and not off.prompt_opens_thinking
    opening = save_reasoning_model(tmp_path / "r1-like", OPENING_TEMPLATE)
    assert load_chat_model(str(opening), dtypes=["float32"], device_map="cpu").prompt_opens_thinking
    plain = load_chat_model(str(save_reasoning_model(tmp_path / "plain", tiny_tokenizer().chat_template)), dtypes=["float32"], device_map="cpu")  # fmt: skip
    assert plain.thinking_markers is None


def test_a_study_of_a_reasoning_model_with_thinking_off(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = save_reasoning_model(tmp_path / "qwen3-like", THINKING_TEMPLATE)
    argv = [
        "--model", str(folder), "--enable-thinking", "false", "--n-trials", "2", "--n-startup-trials", "2",
        "--harmful-train-split", "train[:8]", "--harmless-train-split", "train[:8]",
        "--harmful-eval-split", "eval[:4]", "--harmless-eval-split", "eval[:4]", "--max-response-length", "4",
        "--select", "none", "--output", str(tmp_path / "o"),
    ]  # fmt: skip
    assert main(argv) == 0
    assert (
        "thinking blocks (<think> ... </think>) are skipped when counting refusals" in capsys.readouterr().err
    )
    study = optuna.load_study(
        study_name="qwen3-like", storage=open_storage(folder_storage_url(tmp_path / "o"))
    )
    assert study.user_attrs["scoring"]["--enable-thinking"] == "false"
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2
    # The same study with thinking on would score other prompts: refused, with the reason.
    assert main([*argv[:3], "true", *argv[4:]]) == 1
    assert "--enable-thinking 'false' (now 'true')" in capsys.readouterr().err

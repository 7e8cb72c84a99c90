"""GGUF in: `--model file.gguf` is read by transformers (dequantized); the saved result is safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import save_tiny_gguf, tiny_study, tiny_tokenizer

from abliterate.cli import main
from abliterate.model import load_chat_model, model_name

FAST = tiny_study(3)


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory) -> tuple[Path, transformers.PreTrainedModel]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, save_tiny_gguf(path)


def test_a_gguf_file_loads_with_its_tokenizer_and_template(gguf_model):
    path, written = gguf_model
    chat = load_chat_model(str(path), dtypes=["float32"], device_map="cpu")
    loaded = chat.model.state_dict()
    # The editable matrices arrive as written (GGUF reorders only the query and key rows).
    for name, tensor in written.state_dict().items():
        if "o_proj" in name or "down_proj" in name:
            assert torch.equal(loaded[name], tensor), name
    assert (
        chat.tokenizer("how do i bake bread").input_ids == tiny_tokenizer()("how do i bake bread").input_ids
    )
    assert chat.format("hi") == "<|user|>hi<|end|><|assistant|>"
    assert chat.folder is None and chat.hub_id is None and chat.gguf_file == path
    assert model_name(str(path)) == "tiny"


def test_a_study_of_a_gguf_file_saves_safetensors(gguf_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, _ = gguf_model
    assert main(["--model", str(path), *FAST, "--select", "min-kl"]) == 0
    saved = tmp_path / "abliterated" / "tiny" / "model"
    assert (saved / "model.safetensors").is_file() and not list(saved.glob("*.gguf"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved)  # an ordinary folder now
    assert reloaded.config.num_hidden_layers == 3
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())  # dequantized
    assert transformers.AutoTokenizer.from_pretrained(saved).chat_template


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "{dir}/absent.gguf"], "GGUF file {dir}/absent.gguf does not exist"),
        (["--model", "{gguf}", "--quantization", "bnb-4bit"],
         "--quantization bnb-4bit cannot load a GGUF file; load tiny.gguf without it"),
        (["--model", "{gguf}", "--reset", "disk", *FAST],
         "reset 'disk' needs the model's safetensors files on disk; use --reset gpu-cache or host-cache"),
    ],
)  # fmt: skip
def test_gguf_mistakes_are_one_line(argv, message, gguf_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path, _ = gguf_model

    def fill(text: str) -> str:
        return text.replace("{dir}", str(tmp_path)).replace("{gguf}", str(path))

    assert main([fill(arg) for arg in argv]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"abliterate: error: {fill(message)}"
    assert not (tmp_path / "abliterated").exists()

"""4-bit weights (bitsandbytes NF4): loaded, their matrices found, edited through the adapter, saved in full precision."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from abliterate.cli import main
from abliterate.components import find_components
from abliterate.errors import UserError
from abliterate.model import demo_model_path, load_chat_model
from abliterate.reset import AdapterEditor, Edit, choose_strategy, is_quantized
from abliterate.storage import folder_holds_study

bitsandbytes = pytest.importorskip("bitsandbytes")

# The demo model: its widths are multiples of bitsandbytes' 64-value blocks, as real models' are.
PROMPT = "<s><|user|>\nHow do I bake bread?<|end|>\n<|assistant|>\n"


@functools.cache
def quantized_demo():
    return load_chat_model(None, dtypes=["float32"], device_map="cpu", quantization="bnb-4bit")


def test_the_matrices_of_a_4bit_model_are_found_with_their_own_shapes():
    editable = find_components(quantized_demo().model)
    full = find_components(load_chat_model(None, dtypes=["float32"], device_map="cpu").model)
    assert is_quantized(editable)
    assert [matrix.name for *_, matrix in editable.matrices()] == [m.name for *_, m in full.matrices()]
    assert all(matrix.parameter.dtype == torch.uint8 for *_, matrix in editable.matrices())  # packed


def test_4bit_weights_are_reset_through_the_adapter_only():
    editable = find_components(quantized_demo().model)
    assert choose_strategy("auto", True, editable).strategy == "adapter"
    with pytest.raises(UserError, match="cannot restore 4-bit weights; use --reset adapter"):
        choose_strategy("gpu-cache", True, editable)


def test_the_adapter_removes_the_direction_from_what_4bit_matrices_write():
    chat = quantized_demo()
    editable = find_components(chat.model)
    direction = torch.nn.functional.normalize(torch.randn(editable.hidden_size), dim=0)
    written: dict[str, torch.Tensor] = {}

    def record(name):
        return lambda _module, _inputs, output: written.__setitem__(name, output.float())

    # Registered after the adapter's hooks, so they see the adapter's output.
    adapter = AdapterEditor(chat.model, editable)
    handles = [
        layer.self_attn.o_proj.register_forward_hook(record(f"{index}.attn"))
        for index, layer in enumerate(editable.layers)
    ]
    batch = dict(chat.tokenizer([PROMPT], return_tensors="pt", add_special_tokens=False))
    try:
        chat.model(**batch)
        before = {name: (output @ direction).abs().max().item() for name, output in written.items()}
        adapter.apply([Edit(layer, "attn", direction, 1.0) for layer in range(editable.num_layers)])
        chat.model(**batch)
        after = {name: (output @ direction).abs().max().item() for name, output in written.items()}
    finally:
        adapter.reset()
        adapter.remove()
        for handle in handles:
            handle.remove()
    assert all(value > 1e-3 for value in before.values())
    assert all(after[name] < 1e-3 * before[name] + 1e-5 for name in after), (before, after)


def test_a_4bit_study_saves_a_full_precision_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--quantization", "bnb-4bit", "--n-trials", "2", "--n-startup-trials", "2", "--select", "min-kl",
            "--harmful-eval-split", "eval[:6]", "--harmless-eval-split", "eval[:6]", "--max-response-length", "6",
            "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    assert "reset: adapter (4-bit weights cannot be edited in place)" in capsys.readouterr().err
    saved = tmp_path / "out" / "model"
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    edited, original = (
        load_file(saved / "model.safetensors"),
        load_file(demo_model_path() / "model.safetensors"),
    )
    assert edited.keys() == original.keys()
    assert all(edited[name].dtype == original[name].dtype for name in original)
    changed = {name for name in original if not torch.equal(edited[name], original[name])}
    assert changed and all(name.endswith(("o_proj.weight", "down_proj.weight")) for name in changed)
    transformers.AutoModelForCausalLM.from_pretrained(saved)  # an ordinary model again


def test_without_bitsandbytes_the_error_says_what_to_install(monkeypatch):
    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *args: None if name == "bitsandbytes" else real(name, *args)
    )
    with pytest.raises(
        UserError, match=r"needs bitsandbytes: pip install bitsandbytes \(or the quantization extra\)"
    ):
        load_chat_model(None, device_map="cpu", quantization="bnb-4bit")


def test_a_model_stored_quantized_is_refused_before_the_study(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    quantized_demo().model.save_pretrained(tmp_path / "stored-4bit")
    quantized_demo().tokenizer.save_pretrained(tmp_path / "stored-4bit")
    for quantization in ("none", "bnb-4bit"):
        argv = ["--model", str(tmp_path / "stored-4bit"), "--quantization", quantization, "--output", str(tmp_path / "out")]  # fmt: skip
        assert main(argv) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "abliterate: error: stored-4bit is stored quantized; abliterate merges its edit into full-precision "
            "weights: use the original model (with --quantization bnb-4bit to load it in 4-bit)"
        )
    assert not folder_holds_study(tmp_path / "out")

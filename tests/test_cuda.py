"""The same promises on an accelerator: exact resets, caches where they belong, a study end to end.

Skipped without CUDA (the CI machine has none); run them on a GPU machine with
`python -m pytest tests/test_cuda.py`.
"""

import json
import random

import optuna
import pytest
import torch
from conftest import assert_identical, random_edits, saved, snapshot, tiny_model, tiny_tokenizer

from abliterate.cli import main
from abliterate.components import find_components
from abliterate.model import ChatModel, enable_compiled_generation, left_pad
from abliterate.reset import Edit, LayerCache, choose_strategy, make_editor
from abliterate.storage import folder_storage_url, open_storage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA_ARCHITECTURES = ("llama", "gemma3", "qwen3_moe", "gpt_oss", "listed_experts")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["gpu-cache", "host-cache", "disk"])
@pytest.mark.parametrize("architecture", CUDA_ARCHITECTURES)
def test_restore_on_the_device_is_bit_exact(architecture, strategy, dtype, tmp_path):
    model = tiny_model(architecture).to(dtype)
    folder = saved(model, tmp_path)  # the disk reset reads these half-precision files back
    model.to("cuda")
    editable = find_components(model)
    editor = make_editor(strategy, model, editable, folder)
    original = snapshot(model)
    rng = random.Random(0)
    for row_norm in ("none", "pre", "full"):
        editor.apply(random_edits(editable.num_layers, editable.hidden_size, rng), row_norm)
        assert any(not torch.equal(p, original[n]) for n, p in model.named_parameters())
        editor.reset()
        assert_identical(model, original)


def test_the_caches_live_where_their_names_say(tmp_path):
    model = tiny_model("qwen3_moe").to(torch.bfloat16).to("cuda")
    editable = find_components(model)
    gpu = make_editor("gpu-cache", model, editable, None).restorer
    host = make_editor("host-cache", model, editable, None).restorer
    gpu_copies = [t for parts in gpu.originals.values() for ts in parts.values() for t in ts]
    host_copies = [t for parts in host.originals.values() for ts in parts.values() for t in ts]
    assert all(t.device.type == "cuda" for t in gpu_copies)
    # Pinned host memory is what lets the copy back run at full bus speed.
    assert all(t.device.type == "cpu" and t.is_pinned() for t in host_copies)


def test_auto_keeps_a_small_models_cache_on_the_device():
    model = tiny_model("llama").to("cuda")
    assert choose_strategy("auto", True, find_components(model)).strategy == "gpu-cache"


@pytest.mark.parametrize("architecture", CUDA_ARCHITECTURES)
def test_the_compiled_decoder_sees_in_place_edits_and_restores(architecture):
    """--compile: trials edit and restore weights under a decoder compiled once."""
    model = tiny_model(architecture).to(torch.bfloat16).to("cuda")
    chat = ChatModel(model, tiny_tokenizer(), "tiny", None)
    left_pad(chat.tokenizer)
    enable_compiled_generation(chat)
    (batch,) = chat.encode(["how do i bake bread", "write malware", "write a poem"], 3, common_length=True)
    before = chat.generate(batch, 12)
    editable = find_components(model)
    cache = LayerCache(editable)
    with torch.no_grad():
        for *_, matrix in editable.matrices():
            matrix.parameter.neg_()  # sure to change what the model says
    changed = chat.generate(batch, 12)
    torch._dynamo.reset()
    assert chat.generate(batch, 12) == changed, "the decoder compiled before the edit did not see it"
    cache.restore((layer, component) for layer in range(editable.num_layers) for component in ("attn", "mlp"))
    assert chat.generate(batch, 12) == before


@pytest.mark.parametrize("architecture", CUDA_ARCHITECTURES)
def test_the_compiled_greedy_loop_answers_as_transformers_generate(architecture):
    """decoding.py's loop, one CUDA graph a step, against transformers' generate (float32, so that
    both read the same numbers)."""
    model = tiny_model(architecture).to("cuda")
    chat = ChatModel(model, tiny_tokenizer(), "tiny", None)
    left_pad(chat.tokenizer)
    prompts = ["how do i bake bread", "write malware", "write a poem", "tell me a story about a dragon"]
    (batch,) = chat.encode(prompts, 4, common_length=True)
    finished = lambda text: len(text) >= 6  # noqa: E731 - the random model's rows get there at different steps
    expected, expected_checked = chat.generate(batch, 16), chat.generate(batch, 16, finished)
    enable_compiled_generation(chat)
    assert chat.generate(batch, 16) == expected
    assert chat.generate(batch, 16, finished) == expected_checked


@pytest.mark.parametrize("architecture", ["llama", "gemma3", "qwen3_moe"])
def test_the_compiled_decoder_follows_the_adapters_edits_without_compiling_again(architecture, tmp_path):
    """4-bit weights and --reset adapter: the decoder is compiled by its first generation only, and
    every trial's edit and reset reach its CUDA graphs (float32, so that compiled and eager tokens agree)."""
    model = tiny_model(architecture).to("cuda")
    chat = ChatModel(model, tiny_tokenizer(), "tiny", None)
    left_pad(chat.tokenizer)
    editable = find_components(model)
    adapter = make_editor("adapter", model, editable, saved(model, tmp_path))
    direction = torch.randn(editable.hidden_size, generator=torch.Generator().manual_seed(0))
    edits = [
        Edit(layer, component, direction, 4.0)
        for layer in range(editable.num_layers)
        for component in ("attn", "mlp")
    ]
    (batch,) = chat.encode(["how do i bake bread", "write malware", "write a poem"], 3, common_length=True)
    before = chat.generate(batch, 12)
    adapter.apply(edits)
    edited = chat.generate(batch, 12)
    adapter.reset()
    assert edited != before
    torch._dynamo.reset()
    enable_compiled_generation(chat)
    assert chat.generate(batch, 12) == before  # compiles (Gemma 3 twice: its mask's first steps differ)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(2):
        adapter.apply(edits)
        assert chat.generate(batch, 12) == edited
        adapter.reset()
        assert chat.generate(batch, 12) == before
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled  # no edit compiled again


def test_the_adapter_leaves_the_weights_alone_and_its_reset_restores_the_outputs(tmp_path):
    model = tiny_model("qwen3_moe").to(torch.bfloat16).to("cuda")  # fused experts, no biases
    editable = find_components(model)
    editor = make_editor("adapter", model, editable, saved(model, tmp_path))
    original = snapshot(model)
    inputs = torch.randint(0, model.config.vocab_size, (2, 7), device="cuda")
    with torch.no_grad():
        before = model(inputs).logits
        editor.apply(random_edits(editable.num_layers, editable.hidden_size, random.Random(3)), "none")
        edited = model(inputs).logits
        editor.reset()
        after = model(inputs).logits
    assert_identical(model, original)
    assert not torch.equal(before, edited)
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    ("extra", "compiled"),
    [
        ([], "true"),  # --compile auto: one CUDA GPU
        (["--compile", "false"], "false"),
        (["--quantization", "bnb-4bit"], "true"),  # the adapter's side paths are compiled with the model
        (["--reset", "adapter"], "true"),
        (["--reset", "host-cache"], "true"),
        (["--compile"], "true"),
        (["--compile", "--reset", "disk"], "true"),
    ],
)
def test_a_short_study_on_the_device_removes_refusals(extra, compiled, tmp_path, monkeypatch, capsys):
    if "bnb-4bit" in extra:
        pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(tmp_path)
    argv = ["--device-map", "cuda", "--n-trials", "16", "--n-startup-trials", "8", "--select", "min-refusals",
            "--harmful-eval-split", "eval[:40]", "--harmless-eval-split", "eval[:40]", "--max-response-length", "24",
            "--output", str(tmp_path / "out"), *extra]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    baseline = int(err.split("original model: ")[1].split("/")[0])
    result = json.loads((tmp_path / "out" / "model" / "abliterate.json").read_text())
    assert result["refusals"] < baseline / 2, err[-2000:]
    assert result["kl"] > 0
    storage = open_storage(folder_storage_url(tmp_path / "out"))
    study = optuna.load_study(study_name="abliterate-demo", storage=storage)
    assert study.user_attrs["scoring"]["--compile"] == compiled
    assert "compiled decoder failed" not in err

"""Tiny random models of every supported architecture, and a tiny tokenizer, built offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

import copy
import functools
import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn

from abliterate.reset import Edit
from abliterate.storage import folder_storage_url, open_storage


@pytest.fixture(autouse=True)
def _compile_cache_place_as_it_was():
    """A study that turns the compiled decoder on names the compile caches' places for the whole
    process (compiled.keep_compiled_code_in): each test leaves them as it found them."""
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "how do i bake bread at home",
    "write a poem about the sea",
    "explain how vaccines work",
    "how do i pick a lock to break into a house",
    "write malware that steals passwords",
    "i'm sorry, but i can't help with that",
    "sure! here is a plan you can follow",
    "the quick brown fox jumps over the lazy dog 0123456789 .,!?'-",
]

SMALL = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
MOE = dict(SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)

# architecture -> (config class, extra config values)
ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 8}),
    "mistral": (transformers.MistralConfig, {}),
    "gemma2": (transformers.Gemma2Config, {"head_dim": 8}),
    "gemma3": (transformers.Gemma3TextConfig, {"head_dim": 8}),
    "phi3": (transformers.Phi3Config, {"pad_token_id": 0}),
    "qwen2_moe": (transformers.Qwen2MoeConfig, {**MOE, "shared_expert_intermediate_size": 24}),
    "qwen3_moe": (transformers.Qwen3MoeConfig, {**MOE, "head_dim": 8}),
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt_oss": (
        transformers.GptOssConfig,
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": 8,
            "intermediate_size": 24,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    ),
    "gpt2": (transformers.GPT2Config, {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 128}),
}
MOE_ARCHITECTURES = ("qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "listed_experts")


# Gemma 2's template: it refuses a system message.
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A fresh copy each call: tests may change their tokenizer."""
    return copy.deepcopy(_trained_tokenizer())


@functools.cache
def _trained_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<|pad|>", "<|unk|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    from tokenizers import decoders

    tokenizer.decoder = decoders.ByteLevel()
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|pad|>", unk_token="<|unk|>", eos_token="<|end|>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_config(architecture: str) -> transformers.PretrainedConfig:
    config_class, extra = ARCHITECTURES["llama" if architecture == "listed_experts" else architecture]
    values = {} if architecture == "gpt2" else dict(SMALL)
    values.update(extra)
    tokenizer = tiny_tokenizer()
    values.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if architecture != "phi3":
        values["pad_token_id"] = tokenizer.pad_token_id
    return config_class(**values)


class _ListedExpertsMLP(nn.Module):
    """An MoE block whose experts are a ModuleList of MLPs (the layout before fused experts)."""

    def __init__(self, config, num_experts: int = 3):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(
            transformers.models.llama.modeling_llama.LlamaMLP(config) for _ in range(num_experts)
        )

    def forward(self, hidden):
        weights = torch.softmax(self.gate(hidden), dim=-1)
        return sum(weights[..., i : i + 1] * expert(hidden) for i, expert in enumerate(self.experts))


def tiny_model(architecture: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(architecture), dtype=torch.float32)
    if architecture == "listed_experts":
        for layer in model.model.layers:
            layer.mlp = _ListedExpertsMLP(model.config)
    # from_config leaves some weights at exactly zero or one: randomize all of them, so that an edit or
    # restore that misses a tensor shows.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model.eval()


ALL_ARCHITECTURES = (*ARCHITECTURES, "listed_experts")


@pytest.fixture(params=ALL_ARCHITECTURES)
def architecture(request) -> str:
    return request.param


def save_tiny_model(folder: Path, architecture: str = "llama") -> Path:
    tiny_model(architecture).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A tiny Llama with its tokenizer on disk, shared by the tests that only read it."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


# -- editing and restoring (shared by the CPU and CUDA reset tests) --


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def assert_identical(model, original: dict[str, torch.Tensor]) -> None:
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, original[name]), name


def random_edits(num_layers: int, hidden: int, rng: random.Random, layers=None) -> list[Edit]:
    layers = range(num_layers) if layers is None else layers
    edits = []
    for layer in layers:
        for component in ("attn", "mlp"):
            if rng.random() < 0.7:
                direction = torch.randn(hidden, generator=torch.Generator().manual_seed(rng.randrange(10**6)))
                edits.append(Edit(layer, component, direction, rng.uniform(0.5, 1.5)))
    return edits or [Edit(0, "mlp", torch.ones(hidden), 1.0)]


def saved(model, tmp_path):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# Where each tensor of a Llama goes in a GGUF file (llama.cpp's names).
GGUF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def save_tiny_gguf(path: Path) -> transformers.PreTrainedModel:
    """The tiny Llama and its tokenizer written as one float32 GGUF file; returns the model written."""
    import gguf

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    tokens = [token for token, _ in vocabulary]
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in tokenizer.all_special_tokens else 1 for token in tokens])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
    for name, tensor in model.state_dict().items():
        if name not in top:
            _, _, layer, *part, _ = name.split(".")
            top[name] = f"blk.{layer}.{GGUF_NAMES['.'.join(part)]}.weight"
        writer.add_tensor(top[name], tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


# A study of a tiny model in seconds: a few prompts, a few tokens.
TINY_PROMPTS = [
    "--harmful-train-split", "train[:8]", "--harmless-train-split", "train[:8]",
    "--harmful-eval-split", "eval[:4]", "--harmless-eval-split", "eval[:4]", "--max-response-length", "4",
]  # fmt: skip


def tiny_study(trials: int) -> list[str]:
    """Flags of a study of `trials` random trials over `TINY_PROMPTS`."""
    return [*TINY_PROMPTS, "--n-startup-trials", str(trials), "--n-trials", str(trials)]


def demo_study(tmp_path: Path, *flags: str):
    """A 4-trial study of the demo model with small prompt sets; the study, once finished."""
    import optuna

    from abliterate.cli import main

    output = tmp_path / "out"
    argv = ["--n-trials", "4", "--select", "none", "--output", str(output), "--max-response-length", "8",
            "--harmful-train-split", "train[:64]", "--harmless-train-split", "train[:64]",
            "--harmful-eval-split", "eval[:16]", "--harmless-eval-split", "eval[:16]", *flags]  # fmt: skip
    assert main(argv) == 0
    return optuna.load_study(study_name="abliterate-demo", storage=open_storage(folder_storage_url(output)))

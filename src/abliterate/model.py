"""Loading a chat model, formatting prompts, and the batched passes the study needs.

`ChatModel` wraps a Hugging Face causal LM and its tokenizer. Prompts are formatted with the chat
template and tokenized once into left-padded batches (`encode`); every later pass reuses them:
residuals at the last prompt token, next-token log-probabilities, and greedy generation.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

import jinja2
import torch
import transformers
from torch import nn

from abliterate.attention import use_grouped_decode_attention
from abliterate.decoding import GreedyDecoder
from abliterate.errors import UserError

DEMO_MODEL_NAME = "abliterate-demo"
Batch = dict[str, torch.Tensor]
R = TypeVar("R", torch.Tensor, list[str])  # what a batched pass returns


def demo_model_path() -> Path:
    return Path(str(resources.files("abliterate.data").joinpath("demo_model")))


def model_name(source: str | None) -> str:
    """A short name for folders and studies: the last part of the hub id or path."""
    if source is None or Path(source).expanduser().resolve() == demo_model_path():
        return DEMO_MODEL_NAME
    path = Path(source.rstrip("/"))
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def gguf_file_of(source: str | None) -> Path | None:
    """The GGUF file `source` names (read by transformers, dequantized), or None for a folder or hub id."""
    if source is None or not source.lower().endswith(".gguf"):
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file {source} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading a GGUF file needs the gguf package: pip install gguf (or the gguf extra)")
    return path.resolve()


# Reasoning models write a thinking block before their answer; these are the pairs of markers
# known to open and close one (DeepSeek-R1, Qwen3, QwQ, Kimi...). A model uses the first pair whose
# opening marker is one of its tokens or appears in its chat template.
STOP_CHECK_EVERY_ON_GPU = 4  # see `_StopWhen`
THINKING_MARKERS = (
    ("<think>", "</think>"),
    ("<thinking>", "</thinking>"),
    ("\u25c1think\u25b7", "\u25c1/think\u25b7"),
)


def fold_system_message(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """A leading system message put before the text of the message after it, for chat templates
    that take no system message."""
    if len(messages) < 2 or messages[0]["role"] != "system":
        return messages
    system, first, *rest = messages
    return [{**first, "content": f"{system['content']}\n\n{first['content']}"}, *rest]


@dataclass
class ChatModel:
    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    source: str  # what the user asked for: hub id or folder
    folder: Path | None  # local folder holding the weights, when there is one
    system_prompt: str | None = None
    # The tokenizer as the model ships it (with any --chat-template): what a saved model gets.
    # `tokenizer` itself pads on the left, as batched generation needs.
    tokenizer_as_loaded: transformers.PreTrainedTokenizerBase | None = None
    # The GGUF file the weights were read from (dequantized), when they were: reloads read it again.
    gguf_file: Path | None = None
    # Generate with our own loop around a compiled decode step on a static KV cache (CUDA graphs;
    # eager on a CPU): see `enable_compiled_generation` and `decoding.py`.
    compiled_generation: bool = False
    # Passed to chat templates that take it (`enable_thinking`); None leaves the template's default.
    enable_thinking: bool | None = None
    # Generation steps between checks of `generate`'s `finished`; None: 1 on a CPU, 4 on a GPU.
    stop_check_every: int | None = None

    @property
    def name(self) -> str:
        return model_name(self.source)

    @property
    def hub_id(self) -> str | None:
        """The Hugging Face Hub id the model was loaded by; None for a local folder or file."""
        return None if Path(self.source).expanduser().exists() else self.source

    def pretrained_source(self) -> tuple[str, dict]:
        """What `from_pretrained` reads the original weights from: a folder or id, and its options."""
        if self.gguf_file is not None:
            return str(self.gguf_file.parent), {"gguf_file": self.gguf_file.name}
        return str(self.folder or self.source), {}

    @property
    def tokenizer_to_save(self) -> transformers.PreTrainedTokenizerBase:
        return self.tokenizer_as_loaded or self.tokenizer

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # -- formatting and tokenization -------------------------------------------------------

    def format(self, prompt: str) -> str:
        return self.format_conversation([{"role": "user", "content": prompt}])

    def format_conversation(self, messages: list[dict[str, str]]) -> str:
        """The chat template applied to `messages`, after the system prompt if there is one: as a
        system message, or before the first message's text where the template takes none."""
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
            if not self.template_takes_system_prompt:
                messages = fold_system_message(messages)
        try:
            return self._apply_template(messages)
        except jinja2.TemplateError as error:
            raise self._template_fails(error) from None

    @functools.cached_property
    def template_takes_system_prompt(self) -> bool:
        """Whether the chat template takes a system message. Gemma 2's refuses one ("System role not
        supported"), and some templates drop it unsaid; Google's advice, and what Gemma 3's template
        does itself, is to put it before the user's first message (`fold_system_message`). A
        template that fails without one is an error of its own."""
        user = {"role": "user", "content": "?"}
        try:
            self._apply_template([user])
        except jinja2.TemplateError as error:
            raise self._template_fails(error) from None
        probe = "abliterate-system-probe"
        try:
            return probe in self._apply_template([{"role": "system", "content": probe}, user])
        except jinja2.TemplateError:
            return False

    def _template_fails(self, error: jinja2.TemplateError) -> UserError:
        return UserError(
            f"the chat template of {self.name} fails ({error}); pass a working one with --chat-template"
        )

    def _apply_template(self, messages: list[dict[str, str]]) -> str:
        options = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **options
        )

    @functools.cached_property
    def thinking_markers(self) -> tuple[str, str] | None:
        """The markers of this model's thinking block, if it has one (see `THINKING_MARKERS`)."""
        vocabulary = self.tokenizer.get_vocab()
        template = str(self.tokenizer.chat_template or "")
        for start, end in THINKING_MARKERS:
            if start in vocabulary or start in template:
                return start, end
        return None

    @property
    def prompt_opens_thinking(self) -> bool:
        """Whether the generation prompt itself opens a thinking block (DeepSeek-R1's template ends
        in `<think>`): every response then begins inside it."""
        if self.thinking_markers is None:
            return False
        start, end = self.thinking_markers
        prompt = self.format("?")
        return prompt.rfind(start) > prompt.rfind(end)

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        """Generated tokens as text, without special tokens but for thinking markers (models that
        make them special tokens would otherwise lose where their answer begins)."""
        if self._special_tokens_to_strip is None:
            return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=False)
        for token in self._special_tokens_to_strip:
            texts = [text.replace(token, "") for text in texts]
        return texts

    @functools.cached_property
    def _special_tokens_to_strip(self) -> set[str] | None:
        """None when the tokenizer may drop every special token; else those to drop by hand. Known
        once: `decode` runs at every generation step."""
        markers = set(self.thinking_markers or ())
        special = set(self.tokenizer.all_special_tokens)
        return special - markers if markers & special else None

    def encode(self, prompts: Sequence[str], batch_size: int, common_length: bool = False) -> list[Batch]:
        """Tokenize once into left-padded batches on the input device, in the order given.

        `common_length` pads every batch to the longest prompt of all, not of its batch: a compiled
        decoder then meets one batch shape (two with a shorter last batch) instead of one per batch.
        """
        texts = [self.format(prompt) for prompt in prompts]
        # The template already holds any special tokens the model expects at the start.
        padding: dict = {"padding": True}
        if common_length and texts:
            longest = max(len(ids) for ids in self.tokenizer(texts, add_special_tokens=False).input_ids)
            padding = {"padding": "max_length", "max_length": longest}
        batches = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            encoded = self.tokenizer(chunk, return_tensors="pt", add_special_tokens=False, **padding)
            batches.append(
                {
                    key: value.to(self.input_device)
                    for key, value in encoded.items()
                    if key in ("input_ids", "attention_mask")
                }
            )
        return batches

    # -- passes ----------------------------------------------------------------------------

    @torch.inference_mode()
    def response_logprobs(self, batch: Batch, positions: int) -> torch.Tensor:
        """Log-probabilities predicted at the last `positions` positions, (batch, positions, vocab), float32.

        For a prompt followed by the first `positions - 1` tokens of an answer (teacher forcing),
        these are the distributions of the answer's first `positions` tokens.
        """
        logits = self.model(**batch, use_cache=False, logits_to_keep=positions).logits[:, -positions:, :]
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.inference_mode()
    def answer_ids(self, batch: Batch, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy answers as token ids, (batch, max_new_tokens), and which of them are the answer:
        each ends with its end-of-sequence token, and what follows it (or was never generated) is not."""
        prompt_length = batch["input_ids"].shape[1]
        output = self.model.generate(**batch, generation_config=self._greedy_config(max_new_tokens))
        answers = output[:, prompt_length:]
        missing = max_new_tokens - answers.shape[1]  # every row stopped early
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        answers = torch.nn.functional.pad(answers, (0, missing), value=pad)
        ends = torch.tensor(self._end_token_ids, dtype=torch.long, device=answers.device)
        is_end = torch.isin(answers, ends)
        valid = (torch.cumsum(is_end.long(), dim=1) - is_end.long()) == 0  # up to and with the first end
        valid[:, answers.shape[1] - missing :] = False
        return answers, valid

    @torch.inference_mode()
    def last_token_residuals(self, batch: Batch, layers: Sequence[nn.Module]) -> torch.Tensor:
        """The residual stream after every layer at the last prompt token, (batch, layers, hidden), float32."""
        captured: list[torch.Tensor] = []

        def keep_last_token(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured.append(hidden[:, -1, :].float().cpu())

        handles = [layer.register_forward_hook(keep_last_token) for layer in layers]
        try:
            # Only the residuals are needed: skip the vocabulary projection but for one position.
            self.model(**batch, use_cache=False, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(captured, dim=1)

    @torch.inference_mode()
    def generate(
        self,
        batch: Batch,
        max_new_tokens: int,
        finished: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """Greedy responses. A sequence stops at end-of-sequence, or once `finished(text)` holds: it is
        asked every `stop_check_every` steps, so a sequence may run a few tokens past the point where
        it first held (a refusal marker stays in the text: the verdict is the same)."""
        criteria = transformers.StoppingCriteriaList()
        prompt_length = batch["input_ids"].shape[1]
        every = self.stop_check_every or (1 if self.input_device.type == "cpu" else STOP_CHECK_EVERY_ON_GPU)
        if self.compiled_generation:
            return self.decode(self._decoder.generate(batch, max_new_tokens, finished, self.decode, every))
        if finished is not None:
            criteria.append(_StopWhen(self.decode, prompt_length, finished, every))
        output = self.model.generate(
            **batch,
            generation_config=self._greedy_config(max_new_tokens),
            stopping_criteria=criteria,
        )
        return self.decode(output[:, prompt_length:])

    @property
    def _end_token_ids(self) -> list[int]:
        """The end-of-sequence tokens greedy generation stops at (none, for a model without one)."""
        ends = self._greedy_config(1).eos_token_id
        return [] if ends is None else ends if isinstance(ends, list) else [ends]

    @functools.cached_property
    def _decoder(self) -> GreedyDecoder:
        ends = self._end_token_ids
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else ends[0] if ends else 0
        return GreedyDecoder(self.model, pad, ends, compile=self.input_device.type == "cuda")

    def stream(self, batch: Batch, max_new_tokens: int) -> Iterator[str]:
        """One greedy response, as text pieces while they are generated (generation runs in a thread)."""
        streamer = transformers.TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True
        )
        options = {**batch, "generation_config": self._greedy_config(max_new_tokens), "streamer": streamer}
        worker = threading.Thread(
            target=torch.inference_mode()(self.model.generate), kwargs=options, daemon=True
        )
        worker.start()
        yield from streamer
        worker.join()

    def _greedy_config(self, max_new_tokens: int) -> transformers.GenerationConfig:
        config = transformers.GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
        )
        if self.compiled_generation:
            config.cache_implementation = "static"  # on CUDA, transformers compiles the decoding step
        return config

    def auto_batch_size(self, longest_prompt: int, max_new_tokens: int) -> int:
        """A batch size from free memory: the KV cache of a full-length sequence bounds it."""
        if self.input_device.type != "cuda":
            return 32
        config = self.model.config.get_text_config()
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        bytes_per_token = 2 * config.num_hidden_layers * heads * head_dim * self.dtype.itemsize
        # Activations and the logits of one position come on top of the cache; count them as much again.
        per_sequence = 2 * bytes_per_token * (longest_prompt + max_new_tokens) + 4 * config.vocab_size * 4
        free = min(torch.cuda.mem_get_info(device)[0] for device in _model_devices(self.model))
        return int(max(1, min(256, 0.5 * free // per_sequence)))


class _StopWhen(transformers.StoppingCriteria):
    """Per-sequence stop: every `every` steps, decode what each unfinished sequence generated and ask
    `finished`; a finished sequence stays finished.

    The check runs on the host: on a GPU, decoding and asking every sequence at every step costs
    about as much as the step itself (the decode step of a 7B model reads its weights in 4 ms), so
    it runs every few steps there; on a CPU the step costs far more and every step is asked. Only
    unfinished sequences are decoded.
    """

    def __init__(
        self,
        decode: Callable[[torch.Tensor], list[str]],
        prompt_length: int,
        finished: Callable[[str], bool],
        every: int = 1,
    ):
        self.decode = decode
        self.prompt_length = prompt_length
        self.finished = finished
        self.every = every
        self.steps = 0
        self.done: torch.Tensor | None = None  # per sequence, on the host
        self.done_on_device: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            self.done_on_device = self.done.to(input_ids.device)
        self.steps += 1
        if self.steps % self.every == 0:
            open_rows = (~self.done).nonzero().flatten()
            if len(open_rows):
                generated = input_ids[:, self.prompt_length :].cpu()[open_rows]
                for row, text in zip(open_rows.tolist(), self.decode(generated), strict=True):
                    self.done[row] = self.finished(text)
                self.done_on_device = self.done.to(input_ids.device)
        return self.done_on_device


def compiled_generation_blocker(model: ChatModel) -> str | None:
    """Why the compiled decoder cannot serve this model, or None when it can.

    The compiled decoder reads the weights where they lie, so in-place edits and restores reach it
    (benchmarks/results/generation-h200-2026-12-01.md), and so does the adapter, whose side paths
    read their tensors in place (`reset._RankOneHook`). It needs the whole model on one CUDA device.
    """
    devices = {parameter.device for parameter in model.model.parameters()}
    if len(devices) > 1 or next(iter(devices)).type != "cuda":
        return f"it is on {', '.join(sorted(str(device) for device in devices))}"
    return None


def enable_compiled_generation(model: ChatModel) -> None:
    """Generate with a compiled static-cache decoder: about 2x faster refusal counting on a GPU."""
    blocker = compiled_generation_blocker(model)
    if blocker is not None:
        raise UserError(f"--compile needs the whole model on one CUDA GPU, but {blocker}; drop --compile")
    model.compiled_generation = True


def _model_devices(model: nn.Module) -> set[torch.device]:
    return {parameter.device for parameter in model.parameters() if parameter.device.type == "cuda"}


# -- loading -------------------------------------------------------------------------------


def load_chat_model(
    source: str | None,
    dtypes: Sequence[str] = ("auto",),
    device_map: str = "auto",
    quantization: str = "none",
    trust_remote_code: bool = False,
    chat_template: Path | None = None,
    system_prompt: str | None = None,
    enable_thinking: bool | None = None,
) -> ChatModel:
    """Load a model and tokenizer by hub id or local folder, trying dtypes in order.

    `quantization="bnb-4bit"` loads the weights as 4-bit NF4 (bitsandbytes), computing in the dtype.
    """
    source = source or str(demo_model_path())
    gguf_file = gguf_file_of(source)
    folder = None if gguf_file else local_folder(source)
    load_from = str(folder) if folder else source  # transformers does not expand ~
    gguf_options: dict = {}
    if gguf_file is not None:
        if quantization != "none":
            raise UserError(
                f"--quantization {quantization} cannot load a GGUF file; load {gguf_file.name} without it"
            )
        load_from, gguf_options = str(gguf_file.parent), {"gguf_file": gguf_file.name}
    if device_map.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device-map {device_map}, but no CUDA GPU is visible; use --device-map auto or cpu"
        )
    if quantization == "bnb-4bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "--quantization bnb-4bit needs bitsandbytes: pip install bitsandbytes (or the quantization extra)"
        )
    config = _load_config(load_from, trust_remote_code, gguf_options)
    if getattr(config, "quantization_config", None) is not None:
        # Neither its weights nor its files can carry the edit: there would be nothing to save.
        raise UserError(
            f"{model_name(source)} is stored quantized; abliterate merges its edit into full-precision "
            "weights: use the original model (with --quantization bnb-4bit to load it in 4-bit)"
        )
    tokenizer = _load_tokenizer(load_from, trust_remote_code, chat_template, gguf_options)
    tokenizer_as_loaded = copy.deepcopy(tokenizer)
    left_pad(tokenizer)
    model = None
    errors = []
    for dtype in dtypes:
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                load_from,
                **gguf_options,
                config=config,
                dtype=torch_dtype,
                device_map=None if device_map == "none" else device_map,
                quantization_config=_quantization_config(quantization, torch_dtype),
                trust_remote_code=trust_remote_code,
            )
            break
        except (RuntimeError, TypeError, ValueError) as error:  # an unsupported dtype on this device
            errors.append(f"{dtype}: {str(error).splitlines()[0]}")
        except OSError as error:  # no weights, or unreadable ones: no other dtype will do better
            raise UserError(f"cannot load the weights of {source}: {str(error).splitlines()[0]}") from None
    if model is None:
        raise UserError(
            f"cannot load {source} with any of the dtypes {', '.join(dtypes)} ({'; '.join(errors)})"
        )
    model.eval()
    model.requires_grad_(False)
    use_grouped_decode_attention(model)  # no KV-cache copies in decode steps (see attention.py)
    if gguf_file is not None:
        _forget_gguf_quantization(model)
    if folder is None and gguf_file is None:
        folder = _hub_snapshot(source)
    return ChatModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        folder=folder,
        system_prompt=system_prompt,
        tokenizer_as_loaded=tokenizer_as_loaded,
        enable_thinking=enable_thinking,
        gguf_file=gguf_file,
    )


def _forget_gguf_quantization(model: transformers.PreTrainedModel) -> None:
    """transformers marks a model read from GGUF as quantized, though its weights were dequantized
    to ordinary tensors on load; unmarked, it is edited in place and saved like any other model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _quantization_config(
    quantization: str, dtype: torch.dtype | str
) -> transformers.BitsAndBytesConfig | None:
    if quantization == "none":
        return None
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        # Matrix products run in this dtype; "auto" leaves it to the checkpoint, bfloat16 where unsaid.
        bnb_4bit_compute_dtype=torch.bfloat16 if dtype == "auto" else dtype,
    )


def local_folder(source: str | None) -> Path | None:
    """The model folder `source` names, resolved; None for a hub id. A path that is no model is an error."""
    if source is None:
        return demo_model_path()
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{source} is not a model folder: it has no config.json")
        return path.resolve()
    looks_like_path = (
        source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep in source.replace("/", "")
    )
    if looks_like_path or path.exists():
        raise UserError(f"model folder {source} does not exist")
    return None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _needs_remote_code(folder: Path) -> bool:
    """A local model whose architecture transformers does not know but the folder ships code for."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = json.loads((folder / "config.json").read_text("utf-8"))
    return "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING


def _load_config(source: str, trust_remote_code: bool, options: dict) -> transformers.PretrainedConfig:
    # Checked before transformers sees the folder: it would otherwise ask on the terminal.
    folder_config = not options and Path(source).is_dir()  # a GGUF file holds its own configuration
    if not trust_remote_code and folder_config and _needs_remote_code(Path(source)):
        raise UserError(
            f"model {source!r} runs its own code; pass --trust-remote-code true if you trust its authors"
        )
    try:
        return transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **options)
    except OSError as error:
        if hub_offline():
            raise UserError(
                f"model {source!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; "
                "download it first or pass a local folder"
            ) from None
        if "couldn't connect" in str(error):  # transformers' words when the hub does not answer
            raise UserError(
                f"cannot load model {source!r}: no local folder of that name, and the Hugging Face Hub "
                "cannot be reached; check the path, or download the model where there is a network"
            ) from None
        raise UserError(f"cannot load model {source!r}: {str(error).splitlines()[0]}") from None
    except ValueError as error:
        message = str(error)
        if "trust_remote_code" in message:
            raise UserError(
                f"model {source!r} runs its own code; pass --trust-remote-code true if you trust its authors"
            ) from None
        raise UserError(f"cannot load model {source!r}: {message.splitlines()[0]}") from None


def _load_tokenizer(source: str, trust_remote_code: bool, chat_template: Path | None, options: dict):
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, **options
        )
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the tokenizer of {source!r}: {str(error).splitlines()[0]}") from None
    if chat_template is not None:
        if not chat_template.is_file():
            raise UserError(f"chat template file {chat_template} does not exist")
        tokenizer.chat_template = chat_template.read_text("utf-8")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"the tokenizer of {source!r} has no chat template; pass one with --chat-template FILE (Jinja)"
        )
    return tokenizer


def left_pad(tokenizer) -> None:
    """Pad on the left, so every prompt ends at the last position, where generation starts."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Padding is masked out, so any token the embedding knows will do: the end of sequence,
        # else the unknown token, else id 0.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)


def _hub_snapshot(source: str) -> Path | None:
    """The local snapshot folder of a hub model, which from_pretrained has just filled."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # no snapshot: strategies that read the files fall back to others
        return None


def in_halves_on_oom(run: Callable[[Batch], R], batch: Batch) -> R:
    """Run on the batch; when the accelerator runs out of memory, run on each half and join the results."""
    try:
        return run(batch)
    except torch.OutOfMemoryError:
        rows = batch["input_ids"].shape[0]
        if rows == 1:
            raise UserError(
                "out of memory even with a batch of one prompt; free memory or use a smaller --dtypes"
            ) from None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = rows // 2
    first = in_halves_on_oom(run, {key: value[:half] for key, value in batch.items()})
    second = in_halves_on_oom(run, {key: value[half:] for key, value in batch.items()})
    return torch.cat([first, second]) if isinstance(first, torch.Tensor) else first + second

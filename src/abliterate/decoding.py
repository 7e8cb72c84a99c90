"""Greedy decoding on a static KV cache, in a loop of our own around one compiled decode step.

transformers' `generate` asks the GPU after every decode step whether every sequence has ended,
so the host waits for each step before it queues the next: on a 7B shape, where a compiled step
replays as one CUDA graph in about 6.5 ms, the wait and the loop's own work added about 1 ms a
step (benchmarks/results/trials-decode-h200-2026-12-02.md). Here the step includes the vocabulary
projection and the argmax, so only one token per sequence leaves the graph, and the host looks at
the tokens only when the stop check runs (every few steps), on a copy it made at the check before,
so the GPU never waits for the host's decoding of text.

The text is that of transformers' greedy generate with `model._StopWhen` asked on the same steps:
positions counted from the attention mask as `generate` counts them, a sequence padded after its
end-of-sequence token, and after the check that found it finished. The loop serves the cache
argument of transformers up to 5.2x (`past_key_values` with `cache_position`) and after (`cache`,
which tracks its own length).

A model whose compiled forward reads tensors on the host cannot be captured as a CUDA graph: its
step is compiled without one (`replays_as_a_graph`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import transformers

Batch = dict[str, torch.Tensor]


class GreedyDecoder:
    """Greedy responses of `model` for batches of left-padded prompts.

    One static cache and one compiled step are kept per batch shape, so a study that meets the same
    shape trial after trial compiles once. `compile=False` runs the same loop eagerly (on a CPU, in
    tests)."""

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        pad_token_id: int,
        eos_token_ids: list[int],
        compile: bool = True,
    ):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self.compile = compile
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.takes_cache_position = "cache_position" in parameters
        self._steps: dict[tuple[int, int], tuple[transformers.StaticCache, Callable]] = {}

    @torch.inference_mode()
    def generate(
        self,
        batch: Batch,
        max_new_tokens: int,
        finished: Callable[[str], bool] | None = None,
        decode: Callable[[torch.Tensor], list[str]] | None = None,
        check_every: int = 1,
        defer: bool | None = None,
    ) -> torch.Tensor:
        """Generated token ids, (batch, steps run): pad tokens after a sequence's end.

        Every `check_every` steps the host asks `finished(text)` of each sequence still open (its
        ids so far, decoded by `decode`), pads a finished one from there on, and ends the loop once
        every sequence has ended. With `defer` (the default on a GPU) it reads the ids of the check
        before, copied without waiting, so the GPU goes on with the steps queued since; the text
        is the same, and only the loop's end comes one check later."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, prompt_length = input_ids.shape
        device = input_ids.device
        cache, step = self._step_for(rows, prompt_length + max_new_tokens)
        cache.reset()
        # The mask of the whole cache: the slots of tokens still to come are filled in order and
        # read only once written (the causal mask), so one tensor serves every step.
        full_mask = torch.cat([mask, mask.new_ones(rows, max_new_tokens)], dim=1)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        next_position = positions[:, -1:] + 1
        # Made on the device once: a small tensor copied from the host every step would make the host
        # wait for the GPU.
        cache_positions = torch.arange(prompt_length, prompt_length + max_new_tokens, device=device)
        ends = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)  # before the GPU has work
        token = self._next_tokens(
            cache, input_ids, full_mask, positions, torch.arange(prompt_length, device=device)
        )

        answers = torch.full((rows, max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        checks = _Checks(finished, decode, self.eos_token_ids, rows, device, defer)
        index = -1  # no step at all for max_new_tokens 0
        for index in range(max_new_tokens):
            token = torch.where(done, self.pad_token_id, token)
            answers[:, index] = token
            done = done | torch.isin(token, ends)
            if index + 1 == max_new_tokens:
                break
            if (index + 1) % check_every == 0:
                # A sequence found finished keeps running on the GPU (its rows cost nothing extra in
                # the batch); its tokens after the check are replaced by padding at the end.
                known = checks.ask(answers[:, : index + 1])
                if known is not None and bool(known.all()):
                    break
            slot = cache_positions[index : index + 1]
            token = step(token[:, None], full_mask, next_position + index, slot)
        checks.settle()
        answers = answers[:, : index + 1]
        for row, length in checks.finished_at.items():
            answers[row, length:] = self.pad_token_id  # what followed the check that found it finished
        return answers

    def _step_for(self, rows: int, cache_length: int) -> tuple[transformers.StaticCache, Callable]:
        key = (rows, cache_length)
        if key not in self._steps:
            cache = transformers.StaticCache(config=self.model.config, max_cache_len=cache_length)

            def step(
                token: torch.Tensor,
                mask: torch.Tensor,
                position_ids: torch.Tensor,
                cache_position: torch.Tensor,
            ) -> torch.Tensor:
                return self._next_tokens(cache, token, mask, position_ids, cache_position)

            if self.compile:
                step = (
                    _one_cuda_graph(step)
                    if replays_as_a_graph(self.model)
                    else torch.compile(step, fullgraph=True)
                )
            self._steps[key] = cache, step
        return self._steps[key]

    def _next_tokens(
        self,
        cache: transformers.StaticCache,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
    ) -> torch.Tensor:
        """The greedy token after `input_ids`, written into `cache` at `cache_position`: (batch,)."""
        cache_arguments: dict = {self.cache_argument: cache}
        if self.takes_cache_position:
            cache_arguments["cache_position"] = cache_position
        logits = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **cache_arguments,
        ).logits
        return logits[:, -1].argmax(-1)


def replays_as_a_graph(model: transformers.PreTrainedModel) -> bool:
    """Whether `model`'s compiled forward can be captured as a CUDA graph. transformers' fused
    experts (`grouped_mm`), when compiled with weights other than bfloat16, go through a loop over
    the experts that reads their token counts on the host (`offs.tolist()`), which a capture refuses
    (float16 and float32 Qwen3-MoE and gpt-oss, measured on an H200 with transformers 5.17)."""
    experts = getattr(model.config, "_experts_implementation", None)
    return experts != "grouped_mm" or model.dtype == torch.bfloat16


def _one_cuda_graph(step: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`step` compiled to replay as one CUDA graph. Its output is overwritten by the next replay:
    the loop copies each token into its answers before it asks for the next."""
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)

    def replay(*arguments: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*arguments)

    return replay


class _Checks:
    """The host's side of the stop check: which sequences have ended (an end-of-sequence token,
    or `finished(text)`), learnt from copies of the ids made at each check.

    A deferred copy is made without waiting and read at the next check, by which time the GPU has
    long finished it; the GPU meanwhile runs the steps queued after it instead of idling while the
    host decodes text. Without a `finished`, only ends are tracked."""

    def __init__(
        self,
        finished: Callable[[str], bool] | None,
        decode: Callable[[torch.Tensor], list[str]] | None,
        eos_token_ids: list[int],
        rows: int,
        device: torch.device,
        defer: bool | None,
    ):
        self.finished = finished
        self.decode = decode
        self.ends = torch.tensor(eos_token_ids, dtype=torch.long)
        self.defer = device.type == "cuda" if defer is None else defer
        self.on_cuda = device.type == "cuda"
        self.known = torch.zeros(rows, dtype=torch.bool, pin_memory=self.on_cuda)
        self.finished_at: dict[int, int] = {}  # row -> tokens it had when found finished
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def ask(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Hand over the ids so far; return what is known of every sequence (deferred: as of the
        check before, None at the first)."""
        copy = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=self.on_cuda)
        copy.copy_(ids, non_blocking=self.on_cuda)
        event = None
        if self.on_cuda:
            event = torch.cuda.Event()
            event.record()
        earlier, self.pending = self.pending, (copy, event)
        if not self.defer:
            earlier, self.pending = self.pending, None
        if earlier is None:
            return None
        self._read(*earlier)
        return self.known

    def settle(self) -> None:
        """Read the last copy, if one is waiting."""
        if self.pending is not None:
            self._read(*self.pending)
            self.pending = None

    def _read(self, ids: torch.Tensor, event: torch.cuda.Event | None) -> None:
        if event is not None:
            event.synchronize()
        self.known |= torch.isin(ids, self.ends).any(dim=1)
        if self.finished is None:
            return
        open_rows = (~self.known).nonzero().flatten().tolist()
        if open_rows:
            for row, text in zip(open_rows, self.decode(ids[open_rows]), strict=True):
                if self.finished(text):
                    self.known[row] = True
                    self.finished_at[row] = ids.shape[1]

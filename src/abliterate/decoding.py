"""Greedy decoding on a static KV cache, in a loop of our own around one compiled decode step.

transformers' `generate` asks the GPU after every decode step whether every sequence has ended,
so the host waits for each step before it queues the next: on a 7B shape, where a compiled step
replays as one CUDA graph in about 6.5 ms, the wait and the loop's own work added about 1 ms a
step (benchmarks/results/trials-decode-h200-2026-12-02.md). Here the host asks only when the stop
check runs (every few steps), and the step includes the vocabulary projection and the argmax, so
only one token per sequence leaves the graph.

The tokens are transformers' greedy tokens: positions counted from the attention mask as
`generate` counts them, a sequence that ended is padded from then on, and a sequence the stop check
calls finished is too (`model._StopWhen`, asked on the same steps as in `generate`). The loop
serves both the cache argument of transformers up to 5.2x (`past_key_values` with
`cache_position`) and after (`cache`, which tracks its own length).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import transformers

Batch = dict[str, torch.Tensor]
StopCheck = Callable[[torch.Tensor, None], torch.Tensor]  # (generated ids, scores) -> finished rows


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
        stop_check: StopCheck | None = None,
        sync_every: int = 1,
    ) -> torch.Tensor:
        """Generated token ids, (batch, steps run): pad tokens after a sequence's end.

        `stop_check` is called after every token with the ids so far and returns which sequences
        are finished; the host learns whether all are, and the loop ends, every `sync_every` steps."""
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
        logits = self.model(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **self._cache_arguments(cache, torch.arange(prompt_length, device=device)),
        ).logits
        token = logits[:, -1].argmax(-1)

        answers = torch.full((rows, max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        ends = torch.tensor(self.eos_token_ids, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        generated = max_new_tokens
        for index in range(max_new_tokens):
            token = torch.where(done, self.pad_token_id, token)
            answers[:, index] = token
            done = done | torch.isin(token, ends)
            if stop_check is not None:
                done = done | stop_check(answers[:, : index + 1], None)
            if index + 1 == max_new_tokens or ((index + 1) % sync_every == 0 and bool(done.all())):
                generated = index + 1
                break
            slot = cache_positions[index : index + 1]
            token = step(token[:, None], full_mask, next_position + index, slot)
        return answers[:, :generated]

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
                logits = self.model(
                    input_ids=token,
                    attention_mask=mask,
                    position_ids=position_ids,
                    use_cache=True,
                    logits_to_keep=1,
                    **self._cache_arguments(cache, cache_position),
                ).logits
                return logits[:, -1].argmax(-1)

            if self.compile:
                step = _one_cuda_graph(step)
            self._steps[key] = cache, step
        return self._steps[key]

    def _cache_arguments(self, cache: transformers.StaticCache, cache_position: torch.Tensor) -> dict:
        arguments: dict = {self.cache_argument: cache}
        if self.takes_cache_position:
            arguments["cache_position"] = cache_position
        return arguments


def _one_cuda_graph(step: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`step` compiled to replay as one CUDA graph. Its output is overwritten by the next replay:
    the loop copies each token into its answers before it asks for the next."""
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)

    def replay(*arguments: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*arguments)

    return replay

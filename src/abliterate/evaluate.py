"""Scoring a model: refusals on harmful prompts and KL divergence on harmless ones.

`Evaluator` holds everything that does not change between trials: the tokenized eval batches and
the original model's next-token log-probabilities, computed once. A trial then costs one greedy
generation over the harmful batches (stopped per sequence as soon as a refusal marker appears where
markers alone judge; see judge.py) and one forward pass over the harmless batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from abliterate.errors import UserError
from abliterate.judge import (
    RefusalClassifier,
    RefusalCount,
    RefusalDetector,
    RefusalJudge,
    default_refusal_markers,
)
from abliterate.model import Batch, ChatModel, in_halves_on_oom, load_chat_model
from abliterate.settings import Settings


def kl_divergence(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per row, for (rows, vocab) log-probabilities."""
    divergence = (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(dim=-1)
    # KL is never negative; nearly equal distributions can round below zero.
    return divergence.clamp_min(0.0)


@dataclass(frozen=True)
class Scores:
    refusals: int
    kl: float
    # False when the trial's KL kept it off the front whatever its refusals: they were not counted,
    # and `refusals` holds the original model's count.
    refusals_counted: bool = True
    # Each judge's count where a classifier judged too (`RefusalCount.by_judge`), for the record.
    refusals_by_judge: dict[str, int] | None = None


def load_for_scoring(source: str | None, settings: Settings) -> ChatModel:
    """A model loaded as `settings` say (dtypes, devices, template, system prompt, thinking): how a
    study and `abliterate evaluate` both load what they score."""
    return load_chat_model(
        source,
        dtypes=settings.dtypes,
        device_map=settings.device_map,
        quantization=settings.quantization,
        trust_remote_code=settings.trust_remote_code,
        chat_template=settings.chat_template,
        system_prompt=settings.system_prompt,
        enable_thinking=settings.enable_thinking,
    )


def refusal_judge(settings: Settings, model: ChatModel) -> RefusalJudge:
    """The judge `settings` name: the markers (or the shipped list), and for `classifier` or `both`
    the classifier on the model's device; all of them past the model's thinking block if it has one."""
    thinking, opened = model.thinking_markers, model.prompt_opens_thinking
    markers = RefusalDetector(settings.refusal_markers or default_refusal_markers(), thinking, opened)
    if settings.refusal_judge == "markers":
        return RefusalJudge(markers)
    classifier = RefusalClassifier(settings.refusal_classifier, model.input_device, thinking, opened)
    return RefusalJudge(markers, classifier, settings.refusal_judge)


def eval_batch_size(settings: Settings, model: ChatModel, harmful_prompts: Sequence[str]) -> int:
    """`--batch-size`, or one from free memory for the longest harmful prompt and its response."""
    return settings.batch_size or model.auto_batch_size(
        max(len(model.tokenizer(model.format(prompt)).input_ids) for prompt in harmful_prompts),
        settings.max_response_length,
    )


class NumericalFault(RuntimeError):
    """NaN or inf where a number was expected: the trial is failed, the study goes on."""


class Evaluator:
    def __init__(
        self,
        model: ChatModel,
        harmful_prompts: Sequence[str],
        harmless_prompts: Sequence[str],
        judge: RefusalJudge | RefusalDetector,
        batch_size: int,
        max_response_length: int,
        kl_tokens: int = 1,
    ):
        self.model = model
        self.kl_tokens = kl_tokens
        self.harmful_prompts = list(harmful_prompts)
        self.harmless_prompts = list(harmless_prompts)
        # Markers alone are a judge too: what scripts and tests pass.
        self.judge = judge if isinstance(judge, RefusalJudge) else RefusalJudge(judge)
        self.max_response_length = max_response_length
        self.harmful_batches = model.encode(
            harmful_prompts, batch_size, common_length=model.compiled_generation
        )
        self.harmless_batches, self.kl_positions = self._teacher_forced(
            model.encode(harmless_prompts, batch_size), kl_tokens
        )
        self.prompt_count = len(harmful_prompts) + len(harmless_prompts)
        self.on_batch: Callable[[int], None] | None = None  # told the prompts of each finished batch
        self.reference_logprobs = self._logprobs()
        if not torch.isfinite(self.reference_logprobs).all():
            raise UserError("the original model produces NaN or inf log-probabilities; try another --dtypes")

    def responses(self, stop_early: bool = True) -> list[str]:
        """Greedy responses to the harmful eval prompts; `stop_early` ends each at its first marker
        where the judge allows it (markers alone)."""
        finished = self.judge.markers if stop_early and self.judge.stops_at_markers else None
        responses: list[str] = []
        for batch in self.harmful_batches:
            responses += in_halves_on_oom(
                lambda b: self.model.generate(b, self.max_response_length, finished), batch
            )
            self._batch_done(batch)
        return responses

    def refusals(self, stop_early: bool = True) -> RefusalCount:
        """The judge's verdicts on the responses to the harmful eval prompts."""
        return self.judge(self.responses(stop_early))

    def count_refusals(self, stop_early: bool = True) -> int:
        return self.refusals(stop_early).total

    def kl(self) -> float:
        """Mean KL(original || current) over the harmless eval prompts: of the first response token,
        or with `kl_tokens` N of each of the first N tokens of the original's own greedy answer
        (teacher-forced: one forward pass), averaged over every such token."""
        divergence = kl_divergence(self.reference_logprobs, self._logprobs()).mean().item()
        if not math.isfinite(divergence):
            raise NumericalFault(f"KL divergence is {divergence}")
        return divergence

    def _logprobs(self) -> torch.Tensor:
        """(scored positions, vocab): the distributions at every position that counts, in order."""
        parts = []
        for batch, positions in zip(self.harmless_batches, self.kl_positions, strict=True):
            logprobs = in_halves_on_oom(lambda b: self.model.response_logprobs(b, self.kl_tokens), batch)
            # One position a prompt: a view, no copy of (prompts, vocabulary) in every trial.
            parts.append(logprobs[:, 0] if self.kl_tokens == 1 else logprobs[positions])
            self._batch_done(batch)
        return torch.cat(parts)

    def _teacher_forced(self, batches: list[Batch], kl_tokens: int) -> tuple[list[Batch], list[torch.Tensor]]:
        """Each harmless prompt followed by the first `kl_tokens - 1` tokens of the original's greedy
        answer, and which of the `kl_tokens` predicted positions count (none past the answer's end)."""
        if kl_tokens == 1:  # the first response token: the prompt alone
            return batches, [
                torch.ones(len(b["input_ids"]), 1, dtype=torch.bool, device=b["input_ids"].device)
                for b in batches
            ]
        forced, positions = [], []
        for batch in batches:
            answers, valid = self.model.answer_ids(batch, kl_tokens)
            forced.append(
                {
                    "input_ids": torch.cat([batch["input_ids"], answers[:, :-1]], dim=1),
                    "attention_mask": torch.cat([batch["attention_mask"], valid[:, :-1].long()], dim=1),
                }
            )
            positions.append(valid)
        return forced, positions

    def _batch_done(self, batch: Batch) -> None:
        if self.on_batch is not None:
            self.on_batch(len(batch["input_ids"]))

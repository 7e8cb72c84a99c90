"""`abliterate evaluate`: score any model against its original, exactly as a study scores a trial.

The same prompt sets, refusal markers, system prompt, response length and KL (of the first
response token on the harmless eval prompts, against the original's) as a study with the same
settings: so a saved model, another tool's abliteration and the original can be compared on one
scale. The original is scored first and freed before the model loads: one model in memory at a time.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from abliterate.errors import UserError
from abliterate.evaluate import Evaluator, eval_batch_size, load_for_scoring, refusal_detector
from abliterate.export import write_file_atomically
from abliterate.model import model_name
from abliterate.prompts import load_prompts
from abliterate.settings import Settings


@dataclass(frozen=True)
class Evaluation:
    """A model's scores beside its original's, with what they were measured on."""

    model: str
    original: str
    eval_prompts: int
    refusals: int
    original_refusals: int
    kl: float
    harmless_prompts: int
    max_response_length: int
    kl_tokens: int
    system_prompt: str | None


def evaluate_model(settings: Settings, original: str, console: Console) -> Evaluation:
    """Refusals of `settings.model` and of `original` on the harmful eval prompts, and the KL
    between them on the harmless ones."""
    if settings.model is None:
        raise UserError("abliterate evaluate needs --model: the model to score (a folder or hub id)")
    harmful = load_prompts(settings.harmful_eval, "--harmful-eval")
    harmless = load_prompts(settings.harmless_eval, "--harmless-eval")
    console.print(f"loading the original, {original}")
    reference = load_for_scoring(original, settings)
    detector = refusal_detector(settings, reference)
    batch_size = eval_batch_size(settings, reference, harmful)
    # Both models read the prompts as the original's tokenizer and template write them, as in a study.
    evaluator = Evaluator(
        reference, harmful, harmless, detector, batch_size, settings.max_response_length, settings.kl_tokens
    )
    original_refusals = evaluator.count_refusals()
    vocabulary = reference.tokenizer.get_vocab()
    evaluator.model = reference = None
    _free_memory()

    console.print(f"loading {settings.model}")
    candidate = load_for_scoring(settings.model, settings)
    if candidate.tokenizer.get_vocab() != vocabulary:
        raise UserError(
            f"{settings.model} and {original} have different vocabularies: KL compares next-token "
            "distributions over one vocabulary; give the model this one was made from as --original"
        )
    evaluator.model = candidate
    kl = evaluator.kl()
    refusals = evaluator.count_refusals()
    return Evaluation(
        model=settings.model,
        original=original,
        eval_prompts=len(harmful),
        refusals=refusals,
        original_refusals=original_refusals,
        kl=kl,
        harmless_prompts=len(harmless),
        max_response_length=settings.max_response_length,
        kl_tokens=settings.kl_tokens,
        system_prompt=settings.system_prompt,
    )


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluation_table(evaluation: Evaluation) -> Table:
    table = Table(
        title=f"refusals on {evaluation.eval_prompts} harmful prompts, KL on {evaluation.harmless_prompts} harmless"
    )
    for column in ("model", "refusals", "KL"):
        table.add_column(column, justify="right" if column != "model" else "left")
    table.add_row(
        f"{evaluation.original} (original)", f"{evaluation.original_refusals}/{evaluation.eval_prompts}", "0"
    )
    table.add_row(
        evaluation.model, f"{evaluation.refusals}/{evaluation.eval_prompts}", f"{evaluation.kl:.4f}"
    )
    return table


def default_json_path(model: str) -> Path:
    return Path(f"evaluation-{model_name(model)}.json")


def write_json(evaluation: Evaluation, path: Path) -> None:
    """Write the evaluation atomically: a file that exists is whole."""
    write_file_atomically(path, (json.dumps(asdict(evaluation), indent=1) + "\n").encode())
